//! Generated gRPC types and services. The public API is [`v1`]; [`internal`] is the node-to-node
//! service on the cluster listener.

pub mod v1 {
    tonic::include_proto!("ephemera.v1");
}

// The path of every method of the public services (`/ephemera.v1.Issuer/Issue`, ...).
include!(concat!(env!("OUT_DIR"), "/public_methods.rs"));

pub mod internal {
    tonic::include_proto!("ephemera.internal.v1");
}
