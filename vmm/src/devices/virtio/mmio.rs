//! The virtio-mmio transport, version 2 (virtio 1.x §4.2.2): the register
//! file a driver uses to discover a device, negotiate features, set up
//! queues and start it. Queue notifications reach the device through
//! ioeventfds registered on the QueueNotify register; this register file
//! only sees the slow path.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{status, ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// "virt" in little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// "MOAT" in little-endian.
const VENDOR_ID: u32 = 0x5441_4f4d;

/// Register offsets.
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the QueueNotify register, where ioeventfds are registered.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// One virtio device behind its MMIO register file.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    activated: bool,
    /// Where the active queues' rings lie, for state reports.
    active_rings: Vec<RingAddresses>,
}

/// Where one active queue's rings lie in guest memory.
#[derive(Debug, Clone, Copy)]
struct RingAddresses {
    size: u16,
    avail: GuestAddress,
    used: GuestAddress,
}

fn fresh_queues(sizes: &[u16]) -> Vec<Queue> {
    // virtio-queue only refuses a zero or non-power-of-two maximum, which
    // device constants never are.
    sizes
        .iter()
        .filter_map(|size| Queue::new(*size).ok())
        .collect()
}

impl MmioTransport {
    /// Puts `device` behind a register file. Its queue notification
    /// eventfds are created here; register them with
    /// [`MmioTransport::queue_events`].
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        let queues = fresh_queues(device.queue_max_sizes());
        let queue_events = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_events,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            activated: false,
            active_rings: Vec::new(),
        })
    }

    /// The notification eventfd of each queue, by index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Stops the device as the VMM exits (after the vCPUs have stopped),
    /// so that a backend learns of it from the device, not from a vanished
    /// peer.
    pub fn shutdown(&mut self) {
        if self.activated {
            self.device.shutdown();
            self.activated = false;
        }
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue set-up is only allowed between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.active_rings.clear();
        self.queues = fresh_queues(self.device.queue_max_sizes());
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.interrupt.clear();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        // A driver only ever adds bits; anything else is ignored.
        if value & self.status != self.status {
            return;
        }
        if added & status::FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Legacy drivers are refused: FEATURES_OK does not stick, and
            // the driver sees that when it reads the status back.
            self.status = value & !status::FEATURES_OK;
            return;
        }
        self.status = value;
        if added & status::DRIVER_OK != 0
            && self.status & status::FEATURES_OK != 0
            && !self.activated
        {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let all_valid = self
            .queues
            .iter()
            .all(|q| q.ready() && q.is_valid(&self.mem));
        let events: std::io::Result<Vec<EventFd>> =
            self.queue_events.iter().map(EventFd::try_clone).collect();
        self.active_rings = self
            .queues
            .iter()
            .map(|q| RingAddresses {
                size: q.size(),
                avail: GuestAddress(q.avail_ring()),
                used: GuestAddress(q.used_ring()),
            })
            .collect();
        let result = match (all_valid, events) {
            (true, Ok(queue_events)) => self.device.activate(ActivateContext {
                mem: self.mem.clone(),
                // The device owns the queues from here on; the transport's
                // fresh ones read as not ready, as after a reset.
                queues: std::mem::replace(
                    &mut self.queues,
                    fresh_queues(self.device.queue_max_sizes()),
                ),
                queue_events,
                interrupt: self.interrupt.clone(),
                acked_features: self.acked_features,
            }),
            _ => {
                self.status |= status::DEVICE_NEEDS_RESET;
                return;
            }
        };
        match result {
            Ok(()) => self.activated = true,
            Err(_) => self.status |= status::DEVICE_NEEDS_RESET,
        }
    }

    /// One line on the device's state as the guest and the device see it:
    /// the status, the interrupt, and for each active queue the flags and
    /// index the driver last wrote to its avail ring and those the device
    /// last wrote to its used ring, read from guest memory now; then the
    /// device's own report. For diagnosing a stalled queue.
    pub fn describe(&self) -> String {
        let mut line = format!(
            "type {} status {:#x} activated {} interrupt status {:#x} raised {}",
            self.device.device_type(),
            self.status,
            self.activated,
            self.interrupt.status(),
            self.interrupt.raised()
        );
        let read_u16 = |addr: GuestAddress| {
            self.mem
                .read_obj::<u16>(addr)
                .map_or_else(|_| "?".to_string(), |v| v.to_string())
        };
        for (index, ring) in self.active_rings.iter().enumerate() {
            line.push_str(&format!(
                "; q{index} size {} avail flags {} idx {} used flags {} idx {}",
                ring.size,
                read_u16(ring.avail),
                read_u16(ring.avail.unchecked_add(2)),
                read_u16(ring.used),
                read_u16(ring.used.unchecked_add(2)),
            ));
        }
        let own = self.device.describe();
        if !own.is_empty() {
            line.push_str("; ");
            line.push_str(&own);
        }
        line
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => {
                let before_features_ok =
                    self.status & (status::DRIVER | status::FEATURES_OK) == status::DRIVER;
                if let (true, Some(shift)) = (
                    before_features_ok,
                    [0u32, 32].get(self.driver_features_select as usize),
                ) {
                    let mask = 0xffff_ffffu64 << shift;
                    let offered = self.device.features();
                    self.acked_features = (self.acked_features & !mask)
                        | ((u64::from(value) << shift) & offered & mask);
                }
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM if setup => {
                if let Some(q) = self.selected_queue() {
                    // Out of range sizes leave the queue invalid, which
                    // activation then refuses.
                    q.set_size(value as u16);
                }
            }
            reg::QUEUE_READY if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if setup =>
            {
                let high = offset & 4 != 0;
                let (low, high) = if high {
                    (None, Some(value))
                } else {
                    (Some(value), None)
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                        reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            // Reached only when no ioeventfd matched (e.g. before
            // registration): forward the kick by hand.
            reg::QUEUE_NOTIFY => {
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.set_status(value),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
        } else if let Ok(bytes) = <&mut [u8; 4]>::try_from(&mut *data) {
            *bytes = self.read_register(offset).to_le_bytes();
        } else {
            // Registers are 32 bits wide; other widths read as zero.
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            }
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{read_config_bytes, ActivateError};
    use std::sync::Mutex;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// Records what the transport does to it.
    #[derive(Default)]
    struct Probe {
        activated: Option<(usize, u64)>,
        resets: usize,
    }

    struct TestDevice(Arc<Mutex<Probe>>);

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[0xab, 0xcd], offset, data)
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            self.0.lock().unwrap().activated = Some((ctx.queues.len(), ctx.acked_features));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Probe>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let probe = Arc::new(Mutex::new(Probe::default()));
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        (
            MmioTransport::new(Box::new(TestDevice(probe.clone())), mem, irq).unwrap(),
            probe,
        )
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// Drives the transport the way Linux's virtio_mmio driver does.
    fn negotiate(t: &mut MmioTransport, features_high: u32) {
        write(t, reg::STATUS, status::ACKNOWLEDGE);
        write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(t, reg::DRIVER_FEATURES_SEL, 0);
        write(t, reg::DRIVER_FEATURES, 0xffff_ffff);
        write(t, reg::DRIVER_FEATURES_SEL, 1);
        write(t, reg::DRIVER_FEATURES, features_high);
        write(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn set_up_queue(t: &mut MmioTransport, index: u32, base: u64) {
        write(t, reg::QUEUE_SEL, index);
        assert_eq!(read(t, reg::QUEUE_NUM_MAX), 16);
        write(t, reg::QUEUE_NUM, 16);
        write(t, reg::QUEUE_DESC_LOW, base as u32);
        write(t, reg::QUEUE_DESC_HIGH, 0);
        write(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        write(t, reg::QUEUE_DRIVER_HIGH, 0);
        write(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        write(t, reg::QUEUE_DEVICE_HIGH, 0);
        write(t, reg::QUEUE_READY, 1);
        assert_eq!(read(t, reg::QUEUE_READY), 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(read(&mut t, reg::MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(read(&mut t, reg::VERSION), 2);
        assert_eq!(read(&mut t, reg::DEVICE_ID), 4);
        write(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        write(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(read(&mut t, reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn full_negotiation_activates_the_device_with_acked_features() {
        let (mut t, probe) = transport();
        negotiate(&mut t, 1);
        assert_ne!(read(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        set_up_queue(&mut t, 0, 0x1_0000);
        set_up_queue(&mut t, 1, 0x2_0000);
        let driver_ok = read(&mut t, reg::STATUS) | status::DRIVER_OK;
        write(&mut t, reg::STATUS, driver_ok);
        assert_eq!(
            probe.lock().unwrap().activated,
            Some((2, VIRTIO_F_VERSION_1 | 1))
        );
        assert_eq!(read(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn legacy_driver_without_version_1_is_refused() {
        let (mut t, _) = transport();
        negotiate(&mut t, 0);
        assert_eq!(read(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn queues_not_set_up_mean_needs_reset_not_activation() {
        let (mut t, probe) = transport();
        negotiate(&mut t, 1);
        set_up_queue(&mut t, 0, 0x1_0000);
        let driver_ok = read(&mut t, reg::STATUS) | status::DRIVER_OK;
        write(&mut t, reg::STATUS, driver_ok);
        assert!(probe.lock().unwrap().activated.is_none());
        assert_ne!(read(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_outside_guest_memory_is_not_activated() {
        let (mut t, probe) = transport();
        negotiate(&mut t, 1);
        set_up_queue(&mut t, 0, 0x1_0000);
        set_up_queue(&mut t, 1, 0xfff_0000); // past the 1 MiB of guest memory
        let driver_ok = read(&mut t, reg::STATUS) | status::DRIVER_OK;
        write(&mut t, reg::STATUS, driver_ok);
        assert!(probe.lock().unwrap().activated.is_none());
        assert_ne!(read(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_registers_are_ignored_outside_set_up() {
        let (mut t, _) = transport();
        write(&mut t, reg::QUEUE_SEL, 0);
        write(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(read(&mut t, reg::QUEUE_READY), 0, "before FEATURES_OK");
        write(&mut t, reg::QUEUE_SEL, 9);
        assert_eq!(read(&mut t, reg::QUEUE_NUM_MAX), 0, "no such queue");
    }

    #[test]
    fn reset_stops_the_device_and_clears_state() {
        let (mut t, probe) = transport();
        negotiate(&mut t, 1);
        set_up_queue(&mut t, 0, 0x1_0000);
        set_up_queue(&mut t, 1, 0x2_0000);
        let driver_ok = read(&mut t, reg::STATUS) | status::DRIVER_OK;
        write(&mut t, reg::STATUS, driver_ok);
        write(&mut t, reg::STATUS, 0);
        assert_eq!(probe.lock().unwrap().resets, 1);
        assert_eq!(read(&mut t, reg::STATUS), 0);
        write(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(read(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn config_space_and_odd_widths() {
        let (mut t, _) = transport();
        let mut byte = [0u8; 1];
        t.read(reg::CONFIG + 1, &mut byte);
        assert_eq!(byte, [0xcd]);
        let mut wide = [0xffu8; 2];
        t.read(reg::VERSION, &mut wide);
        assert_eq!(wide, [0, 0], "registers are 32-bit only");
        t.write(reg::STATUS, &[1]);
        assert_eq!(read(&mut t, reg::STATUS), 0, "narrow writes are ignored");
    }

    #[test]
    fn manual_notify_reaches_the_queue_event() {
        let (mut t, _) = transport();
        write(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        write(&mut t, reg::QUEUE_NOTIFY, 99);
    }
}
