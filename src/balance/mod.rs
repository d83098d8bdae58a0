//! Client-side load balancing over discovered endpoints.
