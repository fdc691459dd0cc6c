//! The OpenAPI document against the running server (being written).
