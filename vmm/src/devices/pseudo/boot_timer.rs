//! The boot-time marker: a guest writes [`BOOT_COMPLETE_MAGIC`] to
//! [`BOOT_TIMER_PORT`] once it is up, and the VMM logs the time since it
//! started (Firecracker's boot timer, on the same port and value).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::devices::BusDevice;

/// The port the guest writes the marker to.
pub const BOOT_TIMER_PORT: u64 = 0x3f0;
/// The value that marks "boot complete".
pub const BOOT_COMPLETE_MAGIC: u8 = 123;

/// Records and reports the first boot-complete marker.
pub struct BootTimer {
    vmm_start: Instant,
    reported: Arc<Mutex<Option<Duration>>>,
}

impl BootTimer {
    /// A timer counting from `vmm_start`; the measured time is stored in
    /// `reported` for whoever wants it after the run.
    pub fn new(vmm_start: Instant, reported: Arc<Mutex<Option<Duration>>>) -> Self {
        Self {
            vmm_start,
            reported,
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data != [BOOT_COMPLETE_MAGIC] {
            return;
        }
        let elapsed = self.vmm_start.elapsed();
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        if reported.is_none() {
            *reported = Some(elapsed);
            crate::log_line!(
                "moat-vmm: guest boot time: {} us ({} ms) since VMM start",
                elapsed.as_micros(),
                elapsed.as_millis()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_value_is_recorded_and_only_once() {
        let reported = Arc::new(Mutex::new(None));
        let mut timer = BootTimer::new(Instant::now(), reported.clone());
        timer.write(0, &[1]);
        timer.write(0, &[BOOT_COMPLETE_MAGIC, 0]);
        assert!(reported.lock().unwrap().is_none());
        timer.write(0, &[BOOT_COMPLETE_MAGIC]);
        let first = reported.lock().unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0, &[BOOT_COMPLETE_MAGIC]);
        assert_eq!(reported.lock().unwrap().unwrap(), first);
    }
}
