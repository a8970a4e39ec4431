//! PC legacy devices: the 8250 UART console and the i8042 reset line.

pub mod i8042;
pub mod serial;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// A level-less interrupt line: writing the eventfd injects the IRQ through
/// a KVM irqfd, without a vCPU exit.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
