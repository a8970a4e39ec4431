//! Devices with no real-hardware counterpart, for the VMM's own needs.

pub mod boot_timer;
