//! How results are shown to people and tools (tables, JSON): the workflows in `flare_actors`
//! compute, this module renders.

pub mod cross_site;

pub use cross_site::CrossSiteReport;
