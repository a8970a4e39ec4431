//! The COM1 8250/16550A UART (vm-superio), the guest's console.
//!
//! Its transmit side goes to the VMM's console sink. The sink also watches
//! the kernel's own last words: without ACPI a Linux guest has no power-off
//! device, so on power-off or halt it prints one of [`HALT_LINES`] and stops
//! its CPUs with interrupts disabled, which KVM never reports. That line is
//! the one sign that the guest is done for good. A kernel panic is watched
//! the same way: its panic line is noted on the [`StopSignal`] (so the
//! reset it ends in is reported as [`ExitReason::GuestPanic`], not as a
//! clean reboot), and the line after its stack dump ([`PANIC_REBOOT`] or
//! [`PANIC_END`]) stops the VM at once instead of a second later. (A guest that prints either
//! line from user space can only end its own VM, which it may do anyway.)

use std::io::{self, Write};

use vm_superio::Serial;

use super::EventFdTrigger;
use crate::devices::BusDevice;
use crate::shutdown::{ExitReason, StopSignal};

/// The I/O port base of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// The number of ports a UART decodes.
pub const COM1_PORT_COUNT: u64 = 8;
/// The ISA IRQ (and GSI) of COM1.
pub const COM1_IRQ: u32 = 4;

/// Line endings the kernel prints right before halting for good: on
/// power-off with a power-off handler, on power-off without one (6.x
/// falls back to halting), and on halt.
pub const HALT_LINES: [&[u8]; 3] = [
    b"reboot: Power down",
    b"reboot: Power off not available: System halted instead",
    b"reboot: System halted",
];
/// The start of the kernel's panic line (`Kernel panic - not syncing: …`).
pub const PANIC_START: &[u8] = b"Kernel panic - not syncing";
/// The start of the line the kernel prints once it has said all it will
/// about a panic (`---[ end Kernel panic - not syncing: … ]---`).
pub const PANIC_END: &[u8] = b"---[ end Kernel panic - not syncing";
/// The start of the line a panic with `panic=N` (N > 0) prints before it
/// waits N seconds and resets.
pub const PANIC_REBOOT: &[u8] = b"Rebooting in ";
/// Longest line prefix kept for that check; console lines can be longer.
const MAX_TRACKED_LINE: usize = 512;

/// Where the guest's console output goes, and a watch for its power-off.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    stop: StopSignal,
}

impl ConsoleSink {
    /// A sink writing to `out` and raising `stop` when the guest powers off.
    pub fn new(out: Box<dyn Write + Send>, stop: StopSignal) -> Self {
        Self {
            out,
            line: Vec::with_capacity(MAX_TRACKED_LINE),
            stop,
        }
    }

    fn track(&mut self, byte: u8) {
        match byte {
            b'\n' => {
                let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
                if HALT_LINES.iter().any(|halt| line.ends_with(halt)) {
                    self.stop.raise(ExitReason::GuestPowerOff);
                }
                // Console lines start with a timestamp unless printk.time=0.
                // After the panic line and the stack dump, the kernel says
                // it reboots (panic=N) or closes the panic (panic=0, and it
                // halts); stop there instead of a second later.
                if let Some(at) = find(line, PANIC_START) {
                    if self.stop.guest_panic().is_none() && find(line, PANIC_END).is_none() {
                        let text = String::from_utf8_lossy(&line[at..]).into_owned();
                        crate::log_line!("moat-vmm: the guest kernel panicked: {text}");
                        self.stop.note_guest_panic(text);
                    }
                }
                if let Some(panic_line) = self.stop.guest_panic() {
                    if find(line, PANIC_END).is_some() || find(line, PANIC_REBOOT).is_some() {
                        self.stop.raise(ExitReason::GuestPanic(panic_line));
                    }
                }
                self.line.clear();
            }
            _ if self.line.len() < MAX_TRACKED_LINE => self.line.push(byte),
            _ => {}
        }
    }
}

/// Where `needle` starts in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &byte in buf {
            self.track(byte);
        }
        // A console that went away (closed pipe, full disk) must not stop
        // the guest: its output is dropped instead.
        let _ = self.out.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// COM1 on the port bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl SerialDevice {
    /// A UART that interrupts through `irq` and transmits into `sink`.
    pub fn new(irq: EventFdTrigger, sink: ConsoleSink) -> Self {
        Self {
            serial: Serial::new(irq, sink),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let ([byte], Ok(offset)) = (&mut *data, u8::try_from(offset)) {
            *byte = self.serial.read(offset);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            // The only failure is the interrupt eventfd, which cannot fill up.
            let _ = self.serial.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, Captured, StopSignal, EventFd) {
        let out = Captured::default();
        let stop = StopSignal::new();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = ConsoleSink::new(Box::new(out.clone()), stop.clone());
        let dev = SerialDevice::new(EventFdTrigger(irq.try_clone().unwrap()), sink);
        (dev, out, stop, irq)
    }

    fn send(dev: &mut SerialDevice, text: &[u8]) {
        for b in text {
            dev.write(0, &[*b]);
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_console() {
        let (mut dev, out, stop, _) = device();
        send(&mut dev, b"hello\r\n");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello\r\n");
        assert_eq!(stop.reason(), None);
    }

    #[test]
    fn thre_interrupt_fires_when_enabled() {
        let (mut dev, _, _, irq) = device();
        dev.write(1, &[0x02]); // IER: transmitter holding register empty
        send(&mut dev, b"x");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn kernel_power_down_line_stops_the_vm() {
        let (mut dev, _, stop, _) = device();
        send(&mut dev, b"[    1.234567] reboot: Power down");
        assert_eq!(stop.reason(), None, "not before the line ends");
        send(&mut dev, b"\r\n");
        assert_eq!(stop.reason(), Some(ExitReason::GuestPowerOff));
    }

    #[test]
    fn power_off_without_handler_and_halt_stop_the_vm() {
        for line in [
            &b"[    3.434648] reboot: Power off not available: System halted instead\n"[..],
            b"[    1.0] reboot: System halted\n",
        ] {
            let (mut dev, _, stop, _) = device();
            send(&mut dev, line);
            assert_eq!(stop.reason(), Some(ExitReason::GuestPowerOff));
        }
    }

    #[test]
    fn power_down_text_inside_a_line_is_ignored() {
        let (mut dev, _, stop, _) = device();
        send(
            &mut dev,
            b"reboot: Power down is what we print at the end\n",
        );
        assert_eq!(stop.reason(), None);
    }

    #[test]
    fn a_kernel_panic_stops_the_vm_once_the_kernel_has_said_all() {
        let (mut dev, _, stop, _) = device();
        send(
            &mut dev,
            b"[    2.5] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\r\n",
        );
        send(
            &mut dev,
            b"[    2.5] CPU: 0 PID: 1 Comm: init Not tainted 6.12.0\r\n",
        );
        assert_eq!(stop.reason(), None, "the stack dump comes first");
        send(
            &mut dev,
            b"[    2.6] ---[ end Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100 ]---\r\n",
        );
        assert_eq!(
            stop.reason(),
            Some(ExitReason::GuestPanic(
                "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100".into()
            ))
        );
    }

    #[test]
    fn a_panic_ends_at_the_reboot_line_and_only_after_a_panic_line() {
        let (mut dev, _, stop, _) = device();
        send(
            &mut dev,
            b"---[ end Kernel panic - not syncing: sysrq ]---\n",
        );
        send(&mut dev, b"[ 1.0] Rebooting in 1 seconds..\n");
        assert_eq!(stop.reason(), None, "no panic line came first");
        send(&mut dev, b"[ 2.0] Kernel panic - not syncing: sysrq\n");
        assert_eq!(stop.reason(), None);
        send(&mut dev, b"[ 2.1] Rebooting in 1 seconds..\n");
        assert_eq!(
            stop.reason(),
            Some(ExitReason::GuestPanic(
                "Kernel panic - not syncing: sysrq".into()
            ))
        );
    }

    #[test]
    fn overlong_lines_are_passed_through_whole() {
        let (mut dev, out, _, _) = device();
        let long = vec![b'a'; 4 * MAX_TRACKED_LINE];
        send(&mut dev, &long);
        assert_eq!(out.0.lock().unwrap().len(), long.len());
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let (mut dev, out, _, _) = device();
        dev.write(0, b"ab");
        let mut data = [0u8; 2];
        dev.read(5, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert!(out.0.lock().unwrap().is_empty());
    }
}
