//! The hypervisor's end of the device-model area (hv/abi `ioreq`): what
//! the Linux guest's run loop calls to hand an access in the forwarded
//! window to `doppel run` and wait for its answer, to post a queue notify
//! on the buffered ring, and to collect the interrupts the device model
//! asks for. Pure protocol over [`SharedMem`], host-tested; the kernel
//! maps the area and supplies the waiting (its liveness beat and a
//! time-out).

use doppel_abi::ioreq::{
    self, buffered_push, dm_area_size, guest_pages, irq_check, publish_slot, read_slot, slot_state,
    state, Access, BufIoreq, BufWrite, DmHeader, IoreqError, DM_ALIVE_OFFSET, HV_ALIVE_OFFSET,
    IRQ_OFFSET, MAX_DEVICES, QUIESCED_OFFSET, QUIESCE_OFFSET, RESUME_OFFSET, VIRTIO_QUEUE_NOTIFY,
};
use doppel_abi::SharedMem;
use zerocopy::IntoBytes;

/// Why a forwarded access failed; the guest is stopped with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmError {
    /// The device model broke the protocol.
    Protocol(IoreqError),
    /// No answer before the caller's patience ran out.
    NoAnswer,
    /// The access is not inside a declared device's registers.
    NoDevice { addr: u64 },
}

/// The hypervisor's view of a published device-model area.
pub struct DmLink<M: SharedMem> {
    mem: M,
    header: DmHeader,
    /// The last interrupt sequence seen per device slot.
    irq_seen: [u32; MAX_DEVICES],
    beats: u64,
    /// Forwarded accesses answered, buffered writes posted, edges taken,
    /// interrupt words refused.
    pub stats: DmStats,
}

/// What went over the area.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmStats {
    pub sync: u64,
    pub buffered: u64,
    pub irqs: u64,
    pub refused_irqs: u64,
    /// Epoch handshakes answered, guest pages the device model reported
    /// written, bits it set beyond the guest's pages (dropped).
    pub quiesces: u64,
    pub dm_dirty: u64,
    pub refused_dirty: u64,
}

/// What to do with a guest access at `addr` in the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A write that needs no answer: the buffered ring.
    Buffered,
    /// Everything else: the synchronous slot.
    Sync,
}

impl<M: SharedMem> DmLink<M> {
    /// Publish `header` at the start of `mem` (the whole area, zeroed),
    /// its pages emptied.
    pub fn publish(mem: M, header: DmHeader) -> Self {
        mem.write_bytes(0, header.as_bytes());
        Self {
            mem,
            header,
            irq_seen: [0; MAX_DEVICES],
            beats: 0,
            stats: DmStats::default(),
        }
    }

    pub fn header(&self) -> &DmHeader {
        &self.header
    }

    /// Whether `gpa` is in the forwarded window.
    pub fn claims(&self, gpa: u64) -> bool {
        gpa >= self.header.window_base && gpa - self.header.window_base < self.header.window_size
    }

    /// How a guest access is carried: QueueNotify writes of at most 4
    /// bytes on the buffered ring, the rest synchronously.
    pub fn route(&self, gpa: u64, size: u8, read: bool) -> Route {
        let notify = self
            .header
            .device_at(gpa, u64::from(size))
            .is_some_and(|i| gpa - self.header.devices[i].base == VIRTIO_QUEUE_NOTIFY);
        if notify && !read && size <= 4 {
            Route::Buffered
        } else {
            Route::Sync
        }
    }

    /// The hypervisor is alive: advance its word.
    pub fn beat(&mut self) {
        self.beats = self.beats.wrapping_add(1);
        self.mem.store_u64(HV_ALIVE_OFFSET, self.beats);
    }

    /// The device model's liveness word.
    pub fn dm_alive(&self) -> u64 {
        let mut b = [0u8; 8];
        self.mem.read_bytes(DM_ALIVE_OFFSET, &mut b);
        u64::from_le_bytes(b)
    }

    fn slot_at(&self) -> usize {
        self.header.ioreq_page as usize
    }

    /// Carry `a` (a read or write in a device's registers) to the device
    /// model and wait for its answer, calling `wait` between looks while
    /// it returns true (false: give up). What a read reads. The liveness
    /// word moves while it waits: a hypervisor waiting for an answer is
    /// alive, and a device model that is slow to answer must not take it
    /// for gone.
    pub fn access(&mut self, a: Access, mut wait: impl FnMut() -> bool) -> Result<u64, DmError> {
        if self.header.device_at(a.addr, u64::from(a.size)).is_none() {
            return Err(DmError::NoDevice { addr: a.addr });
        }
        let at = self.slot_at();
        let now = slot_state(&self.mem, at);
        if now != state::NONE {
            // Only we move the slot out of NONE: another state is the
            // device model's doing.
            return Err(DmError::Protocol(IoreqError::BadState(now)));
        }
        publish_slot(&self.mem, at, &a.slot(state::READY));
        loop {
            match slot_state(&self.mem, at) {
                state::READY | state::INPROCESS => {
                    self.beat();
                    if !wait() {
                        return Err(DmError::NoAnswer);
                    }
                }
                state::IORESP_READY => break,
                other => return Err(DmError::Protocol(IoreqError::BadState(other))),
            }
        }
        let answer = a.answer(&read_slot(&self.mem, at));
        // The slot is ours again either way.
        publish_slot(&self.mem, at, &ioreq::Ioreq::default());
        self.stats.sync += 1;
        answer.map_err(DmError::Protocol)
    }

    /// Post the write `a` on the buffered ring, waiting (with `wait`, as
    /// above) while the ring is full.
    pub fn post(&mut self, a: Access, mut wait: impl FnMut() -> bool) -> Result<(), DmError> {
        let offset = a
            .addr
            .checked_sub(self.header.window_base)
            .and_then(|o| u32::try_from(o).ok())
            .ok_or(DmError::NoDevice { addr: a.addr })?;
        let slot = BufIoreq::write(BufWrite {
            offset,
            size: a.size,
            data: a.data as u32,
        })
        .ok_or(DmError::NoDevice { addr: a.addr })?;
        let at = self.header.buffered_page as usize;
        loop {
            match buffered_push(&self.mem, at, slot) {
                Ok(true) => {
                    self.stats.buffered += 1;
                    return Ok(());
                }
                Ok(false) if wait() => self.beat(),
                Ok(false) => return Err(DmError::NoAnswer),
                Err(e) => return Err(DmError::Protocol(e)),
            }
        }
    }

    /// The edges the device model asked for since the last call: `take`
    /// gets each GSI. A word naming another device's GSI is refused (its
    /// sequence is not taken, nothing else changes) and counted;
    /// `refused` hears of it.
    pub fn interrupts(&mut self, mut take: impl FnMut(u32), mut refused: impl FnMut(IoreqError)) {
        for i in 0..(self.header.device_count as usize).min(MAX_DEVICES) {
            let mut b = [0u8; 8];
            self.mem.read_bytes(IRQ_OFFSET + i * 8, &mut b);
            let word = u64::from_le_bytes(b);
            let gsi = self.header.devices[i].gsi;
            match irq_check(i, gsi, word, self.irq_seen[i]) {
                Ok(true) => {
                    self.irq_seen[i] = (word >> 32) as u32;
                    self.stats.irqs += 1;
                    take(gsi);
                }
                Ok(false) => {}
                Err(e) => {
                    self.stats.refused_irqs += 1;
                    refused(e);
                }
            }
        }
    }
}

/// Bytes of the area [`DmLink::publish`] needs for `guest_ram_size` bytes
/// of guest RAM (the dirty bitmap grows with it).
pub const fn area_bytes(guest_ram_size: u64) -> usize {
    dm_area_size(guest_ram_size) as usize
}

impl<M: SharedMem> DmLink<M> {
    fn load_u64(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        self.mem.read_bytes(offset, &mut b);
        self.mem.fence_acquire();
        u64::from_le_bytes(b)
    }

    /// Ask the device model to end epoch `epoch` (`quiesce = epoch + 1`)
    /// and wait for its answer (`quiesced = epoch + 1`: sealed, its pages
    /// in the dirty bitmap, off guest RAM until [`DmLink::resume`]),
    /// calling `wait` between looks while it returns true (false: give
    /// up). The liveness word moves while it waits, as in
    /// [`DmLink::access`].
    pub fn quiesce(&mut self, epoch: u64, mut wait: impl FnMut() -> bool) -> Result<(), DmError> {
        let want = epoch.wrapping_add(1);
        self.mem.fence_release();
        self.mem.store_u64(QUIESCE_OFFSET, want);
        while self.load_u64(QUIESCED_OFFSET) != want {
            self.beat();
            if !wait() {
                return Err(DmError::NoAnswer);
            }
        }
        self.stats.quiesces += 1;
        Ok(())
    }

    /// Move the device model's dirty bitmap into `harvest` (one bit per
    /// guest pfn, Xen's layout): each of its words swapped to zero and
    /// ORed in. Bits for pfns beyond the guest's pages or beyond
    /// `harvest` are dropped and counted, never written. The guest pages
    /// taken.
    pub fn take_dirty(&mut self, harvest: &mut [u8]) -> u64 {
        let pages = guest_pages(self.header.guest_ram_size).min(harvest.len() as u64 * 8);
        let at = self.header.dirty_page as usize;
        let words = (self.header.dirty_bytes / 4) as usize;
        let mut taken = 0u64;
        for w in 0..words {
            if self.mem.load_u32(at + w * 4) == 0 {
                continue;
            }
            let bits = self.mem.take_u32(at + w * 4);
            let first = w as u64 * 32;
            // The bits of this word that name guest pages.
            let keep = match pages.saturating_sub(first) {
                0 => 0,
                n if n >= 32 => u32::MAX,
                n => (1u32 << n) - 1,
            };
            self.stats.refused_dirty += u64::from((bits & !keep).count_ones());
            let bits = bits & keep;
            if bits == 0 {
                continue;
            }
            taken += u64::from(bits.count_ones());
            for (i, b) in bits.to_le_bytes().into_iter().enumerate() {
                if let Some(h) = harvest.get_mut(w * 4 + i) {
                    *h |= b;
                }
            }
        }
        self.stats.dm_dirty += taken;
        taken
    }

    /// The device model's half of an epoch end, around `stage` (which
    /// checkpoints the harvest): quiesce the device model for `epoch`
    /// (waiting with `wait`), OR its pages into `harvest`, `stage` with
    /// both stopped (a consistent cut), then resume it, whatever `stage`
    /// returned. What `stage` returned; a device model that does not
    /// answer is [`DmError::NoAnswer`] and nothing is staged.
    pub fn epoch_cut<R>(
        &mut self,
        epoch: u64,
        harvest: &mut [u8],
        wait: impl FnMut() -> bool,
        stage: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, DmError> {
        self.quiesce(epoch, wait)?;
        self.take_dirty(harvest);
        let staged = stage(harvest);
        self.resume(epoch);
        Ok(staged)
    }

    /// Let the device model go on after epoch `epoch` (`resume = epoch +
    /// 1`, release: after everything staged).
    pub fn resume(&mut self, epoch: u64) {
        self.mem.fence_release();
        self.mem.store_u64(RESUME_OFFSET, epoch.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_abi::ioreq::{
        buffered_pop, device, flag, irq_word, kind, virtio_devices, VIRTIO_WINDOW_BASE,
        VIRTIO_WINDOW_SIZE,
    };
    use doppel_abi::ioreq::{dirty_bit, PAGE};
    use doppel_abi::ByteMem;
    use std::vec;
    use std::vec::Vec;

    type Mem = ByteMem<Vec<u8>>;

    fn link(mem: &Mem) -> DmLink<&Mem> {
        let devs: Vec<_> = virtio_devices(&[device::NET, device::BLK]).collect();
        let h = DmHeader::new(
            0x1000_0000,
            1 << 28,
            VIRTIO_WINDOW_BASE,
            VIRTIO_WINDOW_SIZE,
            &devs,
        );
        DmLink::publish(mem, h)
    }

    fn read(addr: u64) -> Access {
        Access {
            kind: kind::COPY,
            addr,
            size: 4,
            read: true,
            data: 0,
        }
    }

    /// The device model's turn, played inside `wait`: answer the slot.
    fn answer(mem: &Mem, data: u64, tamper: impl Fn(&mut ioreq::Ioreq)) {
        let at = PAGE;
        if slot_state(mem, at) != state::READY {
            return;
        }
        let mut s = read_slot(mem, at);
        s.data = data;
        s.flags = (s.flags & !flag::STATE_MASK) | state::IORESP_READY;
        tamper(&mut s);
        publish_slot(mem, at, &s);
    }

    #[test]
    fn a_read_is_answered_and_the_slot_is_free_again() {
        let mem = ByteMem::new(vec![0u8; area_bytes(1 << 28)]);
        let mut l = link(&mem);
        assert!(DmHeader::validate(l.header()).is_ok());
        let v = l.access(read(0xD000_1070), || {
            answer(&mem, 0xabcd_0000_000f, |_| {});
            true
        });
        assert_eq!(v, Ok(0xf));
        assert_eq!(slot_state(&mem, PAGE), state::NONE);
        assert_eq!(l.stats.sync, 1);
    }

    #[test]
    fn a_changed_answer_or_silence_stops_with_the_reason() {
        let mem = ByteMem::new(vec![0u8; area_bytes(1 << 28)]);
        let mut l = link(&mem);
        let r = l.access(read(0xD000_0070), || {
            answer(&mem, 1, |s| s.addr += 4);
            true
        });
        assert_eq!(r, Err(DmError::Protocol(IoreqError::AnswerChangedRequest)));
        assert_eq!(slot_state(&mem, PAGE), state::NONE, "slot freed");
        let mut patience = 3;
        let r = l.access(read(0xD000_0070), || {
            patience -= 1;
            patience > 0
        });
        assert_eq!(r, Err(DmError::NoAnswer));
        // Outside every device: never posted.
        let mem2 = ByteMem::new(vec![0u8; area_bytes(1 << 28)]);
        let mut l2 = link(&mem2);
        assert_eq!(
            l2.access(read(0xD000_0300), || true),
            Err(DmError::NoDevice { addr: 0xD000_0300 })
        );
        assert_eq!(slot_state(&mem2, PAGE), state::NONE);
    }

    #[test]
    fn the_hypervisor_beats_while_it_waits_for_an_answer() {
        let mem = ByteMem::new(vec![0u8; area_bytes(1 << 28)]);
        let mut l = link(&mem);
        let alive = |m: &Mem| {
            let mut b = [0u8; 8];
            m.read_bytes(HV_ALIVE_OFFSET, &mut b);
            u64::from_le_bytes(b)
        };
        let mut looks = 0;
        let r = l.access(read(0xD000_0070), || {
            looks += 1;
            looks < 50
        });
        assert_eq!(r, Err(DmError::NoAnswer));
        assert!(alive(&mem) >= 49, "the word moved while waiting");
    }

    #[test]
    fn a_slot_the_device_model_moved_is_refused() {
        let mem = ByteMem::new(vec![0u8; area_bytes(1 << 28)]);
        let mut l = link(&mem);
        publish_slot(&mem, PAGE, &read(0xD000_0070).slot(state::IORESP_READY));
        assert_eq!(
            l.access(read(0xD000_0070), || true),
            Err(DmError::Protocol(IoreqError::BadState(state::IORESP_READY)))
        );
    }

    #[test]
    fn queue_notifies_go_buffered_and_arrive_in_order() {
        let mem = ByteMem::new(vec![0u8; area_bytes(1 << 28)]);
        let mut l = link(&mem);
        let notify = 0xD000_1000 + VIRTIO_QUEUE_NOTIFY;
        assert_eq!(l.route(notify, 4, false), Route::Buffered);
        assert_eq!(l.route(notify, 4, true), Route::Sync);
        assert_eq!(l.route(0xD000_1070, 4, false), Route::Sync, "status write");
        for q in 0..3u64 {
            let w = Access {
                read: false,
                data: q,
                ..read(notify)
            };
            l.post(w, || true).unwrap();
        }
        for q in 0..3u32 {
            let got = buffered_pop(&mem, 2 * PAGE).unwrap().unwrap();
            assert_eq!((got.offset, got.size, got.data), (0x1050, 4, q));
        }
        assert_eq!(l.stats.buffered, 3);
    }

    #[test]
    fn only_the_devices_own_gsi_is_raised() {
        let mem = ByteMem::new(vec![0u8; area_bytes(1 << 28)]);
        let mut l = link(&mem);
        let mut got = Vec::new();
        let mut bad = Vec::new();
        mem.store_u64(IRQ_OFFSET, irq_word(1, 5));
        mem.store_u64(IRQ_OFFSET + 8, irq_word(1, 5)); // device 1 is on 6
        l.interrupts(|g| got.push(g), |e| bad.push(e));
        assert_eq!(got, [5]);
        assert_eq!(bad, [IoreqError::ForeignGsi { slot: 1, gsi: 5 }]);
        // Nothing new: no edge; the refused word stays refused.
        got.clear();
        bad.clear();
        l.interrupts(|g| got.push(g), |e| bad.push(e));
        assert!(got.is_empty());
        assert_eq!(bad.len(), 1);
        mem.store_u64(IRQ_OFFSET + 8, irq_word(2, 6));
        l.interrupts(|g| got.push(g), |_| {});
        assert_eq!(got, [6]);
        assert_eq!((l.stats.irqs, l.stats.refused_irqs), (2, 2));
    }

    /// The device model's turn of the handshake, played inside `wait`:
    /// once asked, set `pfns`' bits and answer.
    fn dm_answers(mem: &Mem, pfns: &[u64]) {
        let mut b = [0u8; 8];
        mem.read_bytes(QUIESCE_OFFSET, &mut b);
        let asked = u64::from_le_bytes(b);
        if asked == 0 {
            return;
        }
        for &p in pfns {
            let (off, bit) = dirty_bit(p);
            mem.or_u32(3 * PAGE + off, bit);
        }
        mem.store_u64(QUIESCED_OFFSET, asked);
    }

    #[test]
    fn a_quiesce_waits_for_the_answer_and_the_bits_land_in_the_harvest() {
        let mem = ByteMem::new(vec![0u8; area_bytes(1 << 28)]);
        let mut l = link(&mem);
        let mut looks = 0;
        l.quiesce(6, || {
            looks += 1;
            if looks == 3 {
                dm_answers(&mem, &[0, 9, 65535]);
            }
            true
        })
        .unwrap();
        assert_eq!(looks, 3, "waited for the answer");
        let mut harvest = vec![0u8; 65536 / 8];
        harvest[0] = 0b10;
        assert_eq!(l.take_dirty(&mut harvest), 3);
        assert_eq!(harvest[0], 0b11);
        assert_eq!(harvest[1], 0b10);
        assert_eq!(harvest[8191], 0x80);
        // Swapped to zero: taken once.
        assert_eq!(l.take_dirty(&mut harvest), 0);
        l.resume(6);
        let mut b = [0u8; 8];
        mem.read_bytes(RESUME_OFFSET, &mut b);
        assert_eq!(u64::from_le_bytes(b), 7);
        assert_eq!((l.stats.quiesces, l.stats.dm_dirty), (1, 3));
    }

    #[test]
    fn a_silent_or_stale_device_model_is_no_answer() {
        let mem = ByteMem::new(vec![0u8; area_bytes(1 << 28)]);
        let mut l = link(&mem);
        // An answer for another epoch is no answer.
        mem.store_u64(QUIESCED_OFFSET, 5);
        let mut patience = 10;
        let r = l.quiesce(5, || {
            patience -= 1;
            patience > 0
        });
        assert_eq!(r, Err(DmError::NoAnswer));
        let mut b = [0u8; 8];
        mem.read_bytes(HV_ALIVE_OFFSET, &mut b);
        assert!(u64::from_le_bytes(b) >= 9, "beat while waiting");
    }

    #[test]
    fn bits_beyond_the_guest_never_reach_past_the_harvest() {
        // A guest of 40 pages: 5 harvest bytes; the bitmap page holds
        // 32768 bits.
        let mem = ByteMem::new(vec![0u8; area_bytes(40 * 4096)]);
        let devs: Vec<_> = virtio_devices(&[device::NET]).collect();
        let h = DmHeader::new(0x1000_0000, 40 * 4096, VIRTIO_WINDOW_BASE, 1 << 20, &devs);
        let mut l = DmLink::publish(&mem, h);
        for w in 0..(PAGE / 4) {
            mem.store_u32(3 * PAGE + w * 4, u32::MAX);
        }
        let mut harvest = vec![0u8; 5 + 3];
        assert_eq!(l.take_dirty(&mut harvest[..5]), 40);
        assert_eq!(harvest, [0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0]);
        assert_eq!(l.stats.refused_dirty, 32768 - 40);
        // A harvest shorter than the guest: only what fits.
        for w in 0..2 {
            mem.store_u32(3 * PAGE + w * 4, u32::MAX);
        }
        let mut short = [0u8; 2];
        assert_eq!(l.take_dirty(&mut short), 16);
        assert_eq!(short, [0xff, 0xff]);
        let mut rest = [0u8; 4];
        mem.read_bytes(3 * PAGE, &mut rest);
        assert_eq!(rest, [0; 4], "taken all the same");
    }
}
