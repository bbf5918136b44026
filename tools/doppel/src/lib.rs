//! Doppel's dom0 tool as a library: the Xen migration stream (writer and
//! validating reader), the backup's epoch stager and replica with atomic
//! commit, the acknowledgement back channel, and a deterministic synthetic
//! stream generator.

pub mod ack;
pub mod backup;
pub mod bridge;
pub mod client;
pub mod devices;
pub mod dm;
pub mod epoch;
pub mod figures;
pub mod keepalive;
pub mod kv;
pub mod link;
pub mod machine;
pub mod metrics;
pub mod primary;
pub mod progress;
pub mod protect;
pub mod replica;
pub mod sim;
pub mod sim_kv;
pub mod standby;
pub mod status;
pub mod stream;
pub mod synth;
pub mod takeover;
pub mod telemetry;
pub mod witness;
