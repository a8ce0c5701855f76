#![no_main]
//! See `vblk_fuzz::targets::snapshot_model` for the input format and the properties checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vblk_fuzz::targets::snapshot_model::run(data));
