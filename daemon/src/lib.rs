//! powerinfer-daemon: the engine as a service.
