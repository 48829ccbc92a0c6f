//! Multi-node tests: real flare-node peers on 127.0.0.1 with ephemeral ports, whole transfers,
//! injected faults. One test binary (modules below) so CI links once.

mod util;

mod blob_transfer;
mod child;
mod cli;
mod client_api;
mod consortium;
mod control;
mod controller;
mod cross_site;
mod datasets;
mod external;
mod faults;
mod fedavg;
mod hostile_input;
mod inference;
mod massive;
mod membership;
mod model_file;
mod python_torch;
mod sharing;
mod split;
mod torch;
mod transport;
mod workflows;
