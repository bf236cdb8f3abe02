//! The device seam: what a hot executor needs from an accelerator. GPU crates
//! (`kernels-cuda`, `kernels-hip`) implement [`Device`]; [`SimulatedDevice`] implements it
//! in host memory with a byte budget, so the hybrid device/CPU split runs and is tested on
//! machines without a GPU.

use std::collections::HashMap;
use std::sync::Arc;

use crate::pool::ThreadPool;
use crate::tensor::{Activations, Matrix};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// Host memory standing in for a device (tests, planning).
    Simulated,
    Cuda,
    Hip,
}

impl DeviceKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Simulated => "simulated",
            Self::Cuda => "cuda",
            Self::Hip => "hip",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: DeviceKind,
    pub memory_total: u64,
    pub memory_used: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("device out of memory: {requested} bytes requested, {free} free")]
    OutOfMemory { requested: u64, free: u64 },
    #[error("no device buffer {0}")]
    UnknownBuffer(u64),
    #[error("{0}")]
    Backend(String),
}

/// A matrix (or some of its rows) resident on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceMatrix(pub u64);

/// An accelerator the hot executor computes on.
pub trait Device: Send {
    fn info(&self) -> DeviceInfo;

    /// Copies rows `rows` of `m` to the device, as a matrix of `rows.len()` rows.
    fn upload_rows(&mut self, m: &Matrix, rows: &[u32]) -> Result<DeviceMatrix, DeviceError>;

    /// Releases a matrix.
    fn free(&mut self, id: DeviceMatrix) -> Result<(), DeviceError>;

    /// `out[t][i] = rows[i] · x_t` for every token row of `x`.
    fn matmul(
        &mut self,
        id: DeviceMatrix,
        x: &mut Activations,
        out: &mut [f32],
    ) -> Result<(), DeviceError>;

    /// For a device whose memory is host memory (the simulated one): an uploaded matrix
    /// as the host sees it, and the device's own compute pool, so a hybrid layer can run
    /// its hot part there while the CPU runs the cold part. `None` elsewhere.
    fn host_view(&self, _id: DeviceMatrix) -> Option<(Matrix, Arc<ThreadPool>)> {
        None
    }
}

/// A device in host memory: uploads are copies counted against a byte budget, products
/// run on the CPU kernels, on the device's own worker thread for hybrid layers.
pub struct SimulatedDevice {
    budget: u64,
    used: u64,
    next: u64,
    matrices: HashMap<u64, Matrix>,
    pool: Arc<ThreadPool>,
}

impl SimulatedDevice {
    pub fn new(budget: u64) -> std::io::Result<Self> {
        Ok(Self {
            budget,
            used: 0,
            next: 1,
            matrices: HashMap::new(),
            // The caller plus one worker: the device's own thread for hybrid layers.
            pool: Arc::new(ThreadPool::new(2, "pi-sim")?),
        })
    }
}

impl Device for SimulatedDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: "sim:0".into(),
            kind: DeviceKind::Simulated,
            memory_total: self.budget,
            memory_used: self.used,
        }
    }

    fn upload_rows(&mut self, m: &Matrix, rows: &[u32]) -> Result<DeviceMatrix, DeviceError> {
        let row_bytes = (m.n_bytes() / m.n_rows().max(1)) as u64;
        let requested = row_bytes * rows.len() as u64;
        let free = self.budget - self.used;
        if requested > free {
            return Err(DeviceError::OutOfMemory { requested, free });
        }
        let sub = m
            .select_rows(rows)
            .map_err(|e| DeviceError::Backend(e.to_string()))?;
        self.used += requested;
        let id = self.next;
        self.next += 1;
        self.matrices.insert(id, sub);
        Ok(DeviceMatrix(id))
    }

    fn free(&mut self, id: DeviceMatrix) -> Result<(), DeviceError> {
        let m = self
            .matrices
            .remove(&id.0)
            .ok_or(DeviceError::UnknownBuffer(id.0))?;
        self.used -= m.n_bytes() as u64;
        Ok(())
    }

    fn matmul(
        &mut self,
        id: DeviceMatrix,
        x: &mut Activations,
        out: &mut [f32],
    ) -> Result<(), DeviceError> {
        let m = self
            .matrices
            .get(&id.0)
            .ok_or(DeviceError::UnknownBuffer(id.0))?;
        m.matmul(&self.pool, x, out);
        Ok(())
    }

    fn host_view(&self, id: DeviceMatrix) -> Option<(Matrix, Arc<ThreadPool>)> {
        let m = self.matrices.get(&id.0)?;
        Some((m.clone(), Arc::clone(&self.pool)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::WeightType;
    use crate::rng::Rng;

    #[test]
    fn simulated_device_counts_bytes_and_computes_selected_rows() {
        let mut rng = Rng::new(4);
        let (n_rows, n_cols) = (10, 64);
        let w: Vec<f32> = (0..n_rows * n_cols).map(|_| rng.normal()).collect();
        let m = Matrix::quantize(WeightType::Q8_0, &w, n_rows, n_cols);
        let row_bytes = (m.n_bytes() / n_rows) as u64;
        let mut dev = SimulatedDevice::new(row_bytes * 5).unwrap();
        let rows = [7u32, 2, 9];
        let id = dev.upload_rows(&m, &rows).unwrap();
        assert_eq!(dev.info().memory_used, row_bytes * 3);
        assert_eq!(
            dev.upload_rows(&m, &[0, 1, 3]),
            Err(DeviceError::OutOfMemory {
                requested: row_bytes * 3,
                free: row_bytes * 2
            })
        );
        let x: Vec<f32> = (0..n_cols).map(|_| rng.normal()).collect();
        let pool = ThreadPool::new(1, "t").unwrap();
        let mut acts = Activations::new();
        acts.set(&x, 1);
        let mut all = vec![0.0; n_rows];
        m.matmul(&pool, &mut acts, &mut all);
        let mut some = vec![0.0; 3];
        dev.matmul(id, &mut acts, &mut some).unwrap();
        for (i, &r) in rows.iter().enumerate() {
            assert_eq!(some[i].to_bits(), all[r as usize].to_bits());
        }
        dev.free(id).unwrap();
        assert_eq!(dev.info().memory_used, 0);
        assert_eq!(dev.free(id), Err(DeviceError::UnknownBuffer(id.0)));
    }
}
