//! The offline tools: speed (`bench`, and the serving benchmarks), quality
//! (`perplexity`), calibration (`prepare`) and file inspection (`inspect`).

pub mod bench;
pub mod bench_serving;
pub mod inspect;
pub mod perplexity;
pub mod prepare;
pub mod synth;
