//! Neural-network operators other than matrix products: normalization, rotary position
//! embedding, activations and gating, softmax, element-wise arithmetic.

mod activation;
mod attention;
mod exp;
mod norm;
mod rope;

pub use activation::{
    Glu, add, dual_relu_mul, gelu, gelu_mul, log_sum_exp, mul, relu, relu_mul, scale, silu,
    silu_mul, softmax,
};
pub use attention::{KvElem, attend, attend_capped};
pub use exp::{exp_approx, exp_approx_slice};
pub use norm::{rms_norm, rms_norm_in_place};
pub use rope::{Rope, RopeStyle};
