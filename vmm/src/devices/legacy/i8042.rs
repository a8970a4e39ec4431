//! The i8042 keyboard controller, reduced to what a microVM needs: the CPU
//! reset line (command 0xfe on port 0x64), which Linux pulses on reboot.

use vm_superio::I8042Device;

use crate::devices::BusDevice;
use crate::shutdown::{ExitReason, StopSignal};

/// Base port of the controller (data at 0x60, command/status at 0x64).
pub const I8042_PORT: u64 = 0x60;
/// Ports decoded from the base: 0x60 through 0x64.
pub const I8042_PORT_COUNT: u64 = 5;

/// Raises a guest reset when the controller's reset line is pulsed.
#[derive(Debug)]
pub struct ResetLine(StopSignal);

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.raise(ExitReason::GuestReset);
        Ok(())
    }
}

/// The i8042 on the port bus.
pub struct I8042 {
    inner: I8042Device<ResetLine>,
}

impl I8042 {
    /// A controller whose reset command raises `stop`.
    pub fn new(stop: StopSignal) -> Self {
        Self {
            inner: I8042Device::new(ResetLine(stop)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0xff, |o| self.inner.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            let _ = self.inner.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_the_vm() {
        let stop = StopSignal::new();
        let mut dev = I8042::new(stop.clone());
        dev.write(0, &[0xfe]);
        assert_eq!(stop.reason(), None, "0xfe on the data port is not a reset");
        dev.write(4, &[0xfe]);
        assert_eq!(stop.reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn status_reads_as_idle() {
        let mut dev = I8042::new(StopSignal::new());
        let mut status = [0xaa];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
    }
}
