//! Emulated devices and the buses (port I/O and MMIO) that route guest
//! accesses to them.

pub mod legacy;
pub mod pseudo;
pub mod virtio;

use std::sync::{Arc, Mutex};

/// A device on a bus. Offsets are relative to the device's base.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors registering devices on a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("range {base:#x}+{len} overlaps a device already at {other_base:#x}+{other_len}")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range already registered.
        other_base: u64,
        /// Length of the range already registered.
        other_len: u64,
    },
    /// A range of length zero, or one that runs past the bus's last address.
    #[error("range {base:#x}+{len} is empty or runs past the end of the bus")]
    BadRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A bus: maps address ranges to devices. Accesses nobody claims read as
/// all-ones and writes to them are dropped, as on a PC.
#[derive(Clone)]
pub struct Bus {
    last_address: u64,
    devices: Vec<(u64, u64, SharedDevice)>,
}

impl Bus {
    /// The 64 KiB port-I/O space.
    pub fn pio() -> Self {
        Self {
            last_address: 0xffff,
            devices: Vec::new(),
        }
    }

    /// The 64-bit MMIO space.
    pub fn mmio() -> Self {
        Self {
            last_address: u64::MAX,
            devices: Vec::new(),
        }
    }

    /// Claims `base..base + len` for `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let last = len
            .checked_sub(1)
            .and_then(|l| base.checked_add(l))
            .filter(|last| *last <= self.last_address)
            .ok_or(BusError::BadRange { base, len })?;
        for (other_base, other_len, _) in &self.devices {
            let other_last = other_base + (other_len - 1);
            if base <= other_last && *other_base <= last {
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

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        self.devices
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - base < *len)
            .map(|(base, _, device)| (addr - base, device))
    }

    /// Routes a guest read at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((offset, device)) => lock(device).read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Routes a guest write at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((offset, device)) = self.find(addr) {
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
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::pio();
        bus.insert(0x3f8, 8, device.clone()).unwrap();
        let mut data = [0u8; 1];
        bus.read(0x3fd, &mut data);
        assert_eq!(data, [5]);
        bus.write(0x3f8, b"x");
        assert_eq!(device.lock().unwrap().writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn unclaimed_ports_read_all_ones() {
        let bus = Bus::pio();
        let mut data = [0u8; 2];
        bus.read(0x80, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        bus.write(0x80, &[1]);
    }

    #[test]
    fn overlapping_and_bad_ranges_are_refused() {
        let mut bus = Bus::pio();
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
