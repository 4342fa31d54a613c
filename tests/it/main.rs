//! One integration-test binary against the real Postgres and Kafka (see `deploy/local/`).
//! Each test gets its own database and, where it needs one, its own topic.

mod attribution;
mod attribution_rollups;
mod auth;
mod billing;
mod cli;
mod crash;
mod demo;
mod exactly_once;
mod exports;
mod fold;
mod grpc;
mod helpers;
mod http;
mod ingest;
mod kafka;
mod kafka_ingest;
mod kafka_loadgen;
mod quota;
mod tls;
mod transactions;
mod usage_support;
