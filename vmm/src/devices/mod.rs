//! Emulated devices and the port-I/O bus that routes guest accesses to them.

pub mod legacy;
pub mod pseudo;

use std::sync::{Arc, Mutex};

/// A device on the port-I/O bus. Offsets are relative to the device's base.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// Errors registering devices on a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim overlapping port ranges.
    #[error("port range {base:#x}+{len} overlaps a device already at {other_base:#x}+{other_len}")]
    Overlap {
        /// Base of the rejected range.
        base: u16,
        /// Length of the rejected range.
        len: u16,
        /// Base of the range already registered.
        other_base: u16,
        /// Length of the range already registered.
        other_len: u16,
    },
    /// A range of length zero or one that runs past port 0xffff.
    #[error("port range {base:#x}+{len} is empty or runs past 0xffff")]
    BadRange {
        /// Base of the rejected range.
        base: u16,
        /// Length of the rejected range.
        len: u16,
    },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// The port-I/O bus: maps port ranges to devices. Accesses to unclaimed
/// ports read as all-ones and writes to them are dropped, as on a PC.
#[derive(Default, Clone)]
pub struct PioBus {
    devices: Vec<(u16, u16, SharedDevice)>,
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims ports `base..base + len` for `device`.
    pub fn insert(&mut self, base: u16, len: u16, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let end = u32::from(base) + u32::from(len);
        for (other_base, other_len, _) in &self.devices {
            let other_end = u32::from(*other_base) + u32::from(*other_len);
            if u32::from(base) < other_end && u32::from(*other_base) < end {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base: *other_base,
                    other_len: *other_len,
                });
            }
        }
        self.devices.push((base, len, device));
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(u16, &SharedDevice)> {
        self.devices
            .iter()
            .find(|(base, len, _)| {
                port >= *base && u32::from(port) < u32::from(*base) + u32::from(*len)
            })
            .map(|(base, _, device)| (port - base, device))
    }

    /// Routes a guest `in` at `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((offset, device)) => lock(device).read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Routes a guest `out` at `port`.
    pub fn write(&self, port: u16, data: &[u8]) {
        if let Some((offset, device)) = self.find(port) {
            lock(device).write(offset, data);
        }
    }
}

fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    // A device whose holder panicked is still the best state we have.
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, device.clone()).unwrap();
        let mut data = [0u8; 1];
        bus.read(0x3fd, &mut data);
        assert_eq!(data, [5]);
        bus.write(0x3f8, b"x");
        assert_eq!(device.lock().unwrap().writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn unclaimed_ports_read_all_ones() {
        let bus = PioBus::new();
        let mut data = [0u8; 2];
        bus.read(0x80, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        bus.write(0x80, &[1]);
    }

    #[test]
    fn overlapping_and_bad_ranges_are_refused() {
        let mut bus = PioBus::new();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let err = bus
            .insert(0x64, 2, Arc::new(Mutex::new(Recorder::default())))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("overlaps a device already at 0x60+5"),
            "{err}"
        );
        assert!(bus
            .insert(0x65, 1, Arc::new(Mutex::new(Recorder::default())))
            .is_ok());
        assert!(matches!(
            bus.insert(0xffff, 2, Arc::new(Mutex::new(Recorder::default()))),
            Err(BusError::BadRange { .. })
        ));
        assert!(bus
            .insert(0x10, 0, Arc::new(Mutex::new(Recorder::default())))
            .is_err());
    }
}
