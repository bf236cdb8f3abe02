//! powerinfer-proto: the wire contract of powerinferd — package `powerinfer.v1`
//! (`InferenceService`, `ControlService`) as generated Rust types, clients and servers.
//!
//! Only generated code and the descriptor set live here; domain types never derive prost,
//! and conversions between the two live in the daemon and the client.

/// Generated types of `powerinfer.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("powerinfer.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("powerinfer_descriptor");
