//! How results are shown to people and tools (tables, JSON): the workflows in `flare_actors`
//! compute, this module renders.

pub mod cross_site;
pub mod plot;
mod report;
mod summary;

pub use cross_site::CrossSiteReport;
pub use report::{draw, report};
pub use summary::{summarize, write_outputs};
