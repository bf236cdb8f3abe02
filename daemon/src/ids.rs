//! Identifiers that must not be mixed up (defined in `powerinfer_ops::ids`, where the
//! device trait needs them too).

pub use powerinfer_ops::ids::{LayerId, SeqSlot, TokenId};
