//! powerinfer-client.
