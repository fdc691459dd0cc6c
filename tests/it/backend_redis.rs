//! Redis conformance (filled in by the Redis backend work).
