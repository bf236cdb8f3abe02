//! Low-latency receives for hand-offs inside a step: a thread waking another through the
//! OS costs about 8 µs on these machines, as much as a small layer's work, so a receiver
//! that expects its message soon spins on the channel for a while before it blocks.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvError, TryRecvError};

/// How long a receiver inside a step spins before it parks: longer than a layer's hand-
/// off usually takes, short enough that a core is not burnt for long when the message
/// is far off (the other side computing a whole layer).
pub const HANDOFF_SPIN: Duration = Duration::from_micros(50);

/// How long a receiver spins that waits for another executor's computation (a layer's
/// cold half, the device's attention seen from the cold side): such a wait is long, and
/// on a machine with as many compute threads as cores a spinning waiter takes a core
/// from the thread it waits for (measured with `powerinferd bench --pipeline --device
/// sim` on two cores: the engine's per-token cost over the direct loop fell when these
/// waits stopped spinning). Just long enough for a message already on its way.
pub const PEER_SPIN: Duration = Duration::from_micros(2);

/// Receives from `rx`, spinning for up to `spin` before blocking.
pub fn recv_spinning<T>(rx: &Receiver<T>, spin: Duration) -> Result<T, RecvError> {
    let start = Instant::now();
    let mut n = 0u32;
    loop {
        match rx.try_recv() {
            Ok(v) => return Ok(v),
            Err(TryRecvError::Disconnected) => return Err(RecvError),
            Err(TryRecvError::Empty) => {}
        }
        n = n.wrapping_add(1);
        // Reading the clock costs more than a spin: look at it every 64 rounds.
        if n.is_multiple_of(64) && start.elapsed() >= spin {
            return rx.recv();
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receives_spinning_blocking_and_sees_a_closed_channel() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        tx.send(1).unwrap();
        assert_eq!(recv_spinning(&rx, HANDOFF_SPIN), Ok(1));
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(2).unwrap();
        });
        assert_eq!(recv_spinning(&rx, Duration::from_micros(10)), Ok(2));
        sender.join().unwrap();
        assert_eq!(recv_spinning(&rx, HANDOFF_SPIN), Err(RecvError));
    }
}
