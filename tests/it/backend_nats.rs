//! NATS JetStream conformance (filled in by the NATS backend work).
