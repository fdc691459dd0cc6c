//! Redis implementations of [`StateStore`](crate::store::StateStore),
//! [`Queue`](crate::store::Queue) and [`DataStore`](crate::store::DataStore),
//! so that several processes share one deployment. (Work in progress.)
