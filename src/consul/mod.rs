//! Consul: service registration with health checks, and discovery of healthy instances
//! through blocking queries.
