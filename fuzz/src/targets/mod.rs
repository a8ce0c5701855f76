//! One module per fuzz target: `run(data)` is the target, `seeds()` its seed inputs.

pub mod api_validation;
pub mod config_space;
pub mod engine_model;
pub mod metadata_records;
pub mod snapshot_model;
pub mod virtio_request;

/// A target's seeds: (name, input).
pub type Seeds = fn() -> Vec<(&'static str, Vec<u8>)>;
/// A target's entry point.
pub type Run = fn(&[u8]);
/// Every target: name, entry point, seeds.
pub const ALL: &[(&str, Run, Seeds)] = &[
    ("virtio_request", virtio_request::run, virtio_request::seeds),
    ("config_space", config_space::run, config_space::seeds),
    ("metadata_records", metadata_records::run, metadata_records::seeds),
    ("api_validation", api_validation::run, api_validation::seeds),
    ("engine_model", engine_model::run, engine_model::seeds),
    ("snapshot_model", snapshot_model::run, snapshot_model::seeds),
];
