//! Where each part of a model is computed, once a placement is applied: per layer, the
//! side of its attention block (and with it the residual stream during the layer), how
//! many of its neurons form the hot side, and where its predictor runs; the side of the
//! output head.
//!
//! Without a placement everything is on the host and no layer has a hot side. A placement
//! without a device (the all-CPU reference of a hybrid run) keeps everything on the host
//! but splits each layer's neurons at the same boundary, so the FFN sums its hot and cold
//! sides in the same order as the hybrid run does.

use std::ops::Range;

use powerinfer_ops::transformer::is_side_boundary;

/// Which side computes a part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Side {
    #[default]
    Host,
    Device,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Device => "device",
        }
    }
}

/// One layer's split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerPartition {
    /// Where the attention block (norms, q/k/v/o, the layer's KV cache) runs.
    pub attention: Side,
    /// Neurons `0..hot` (after renumbering) form the hot side; a multiple of the neuron
    /// range. On the device when the attention is.
    pub hot: usize,
    /// Where the layer's predictor runs.
    pub predictor: Side,
}

/// What an applied placement put where.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Partition {
    pub layers: Vec<LayerPartition>,
    /// Where the output norm and head run.
    pub head: Side,
}

/// A partition that breaks the rules the executors rely on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartitionError {
    #[error("layer {layer}: {hot} hot neurons do not fit {n_ff} or a whole number of ranges")]
    BadHot {
        layer: usize,
        hot: usize,
        n_ff: usize,
    },
    #[error("layer {layer}: its {what} is on the device but its attention is not")]
    Detached { layer: usize, what: &'static str },
}

impl Partition {
    /// Everything on the host, no hot sides.
    pub fn host(n_layer: usize) -> Self {
        Self {
            layers: vec![LayerPartition::default(); n_layer],
            head: Side::Host,
        }
    }

    /// Checks the rules: hot sides are whole neuron ranges within the layer; a hot side on
    /// the device (or a device predictor) needs the layer's attention there, since the
    /// residual stream of the layer lives where its attention runs and the merge of the
    /// two sides happens there.
    pub fn validate(&self, n_ff: usize) -> Result<(), PartitionError> {
        for (layer, p) in self.layers.iter().enumerate() {
            if p.hot > n_ff || (!is_side_boundary(p.hot) && p.hot != n_ff) {
                return Err(PartitionError::BadHot {
                    layer,
                    hot: p.hot,
                    n_ff,
                });
            }
            if p.attention == Side::Host && p.predictor == Side::Device {
                return Err(PartitionError::Detached {
                    layer,
                    what: "predictor",
                });
            }
        }
        Ok(())
    }

    /// Whether any part runs on the device.
    pub fn uses_device(&self) -> bool {
        self.head == Side::Device || self.layers.iter().any(|l| l.attention == Side::Device)
    }

    /// Maximal runs of consecutive layers whose attention runs on the same side, in order.
    pub fn segments(&self) -> Vec<(Side, Range<usize>)> {
        let mut out: Vec<(Side, Range<usize>)> = Vec::new();
        for (l, p) in self.layers.iter().enumerate() {
            match out.last_mut() {
                Some((side, r)) if *side == p.attention => r.end = l + 1,
                _ => out.push((p.attention, l..l + 1)),
            }
        }
        out
    }

    /// Hot neurons per layer.
    pub fn hot(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers.iter().map(|l| l.hot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_and_rules() {
        let dev = |hot| LayerPartition {
            attention: Side::Device,
            hot,
            predictor: Side::Device,
        };
        let p = Partition {
            layers: vec![dev(128), dev(0), LayerPartition::default(), dev(256)],
            head: Side::Host,
        };
        assert_eq!(
            p.segments(),
            vec![
                (Side::Device, 0..2),
                (Side::Host, 2..3),
                (Side::Device, 3..4)
            ]
        );
        assert!(p.uses_device());
        assert_eq!(p.validate(256), Ok(()));
        assert!(matches!(
            p.validate(200),
            Err(PartitionError::BadHot { layer: 3, .. })
        ));
        let mut q = Partition::host(2);
        q.layers[1].predictor = Side::Device;
        assert_eq!(
            q.validate(256),
            Err(PartitionError::Detached {
                layer: 1,
                what: "predictor"
            })
        );
        assert!(!Partition::host(3).uses_device());
        // A hot side on the host: the all-CPU reference of a hybrid split.
        let mut r = Partition::host(1);
        r.layers[0].hot = 128;
        assert_eq!(r.validate(300), Ok(()));
        r.layers[0].hot = 300;
        assert_eq!(r.validate(300), Ok(()), "every neuron hot");
    }
}
