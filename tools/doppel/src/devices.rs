//! The device model under replication (issue 21): `doppel primary --net
//! ... --disk ...` serves the Linux guest's virtio devices from a thread
//! of its own (doppel::dm in replicated mode), and the replication loop
//! ([`crate::primary::Primary`]) takes what the device model sealed at
//! each epoch end (its state blob and the epoch's disk writes) into that
//! epoch's checkpoint, and releases the epoch's held transmit frames when
//! the backup has committed it. docs/DEVICES.md, "Under replication".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::dm::{self, Backends, DeviceModel, DiskWrite, Pace, Stats};
use crate::machine::MachineRam;

/// What a checkpoint carries of the devices: the state blob and the
/// epoch's disk writes (byte offsets, whole sectors).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SealedDevices {
    pub state: Vec<u8>,
    pub disk: Vec<DiskWrite>,
}

/// The replication loop's view of the devices.
pub trait EpochDevices: Send + Sync + std::fmt::Debug {
    /// The state and disk writes the device model sealed at the end of
    /// hypervisor epoch `epoch` (the hypervisor quiesces the device model
    /// before it stages the checkpoint, so the seal is there by the time
    /// the checkpoint is; waits up to `limit` all the same).
    fn sealed(&self, epoch: u64, limit: Duration) -> Result<SealedDevices, String>;
    /// Every byte of the disk as writes (the initial sync of a new stream
    /// session), read while the device model cannot write it.
    fn whole_disk(&self) -> Result<Vec<DiskWrite>, String>;
    /// Hypervisor epoch `epoch` is committed: its held frames may go out.
    fn committed(&self, epoch: u64);
    /// Frames held for epochs not committed yet.
    fn held_frames(&self) -> usize;
}

struct Shared {
    /// `None` until the hypervisor publishes the device-model area.
    dm: Mutex<Option<DeviceModel>>,
    stop: AtomicBool,
    /// The device model stopped on its own (the machine is gone), or
    /// could not start: why.
    failed: Mutex<Option<String>>,
}

/// The device model running in a thread.
pub struct DeviceThread {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DeviceThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceThread")
            .field("failed", &self.failed())
            .finish()
    }
}

type Guard<'a> = MutexGuard<'a, Option<DeviceModel>>;

fn lock(m: &Mutex<Option<DeviceModel>>) -> Guard<'_> {
    // A panic in the device model thread is a bug; its state is still
    // the last consistent one (every step is whole or refused).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DeviceThread {
    /// In a thread: wait (up to `wait` once the locator holds something
    /// else, for ever while it is zero) for the hypervisor to publish its
    /// device-model area in `ram`, back its devices with `backends` in
    /// replicated mode, and serve them until [`DeviceThread::stop`] or
    /// until the hypervisor's liveness word stands still for
    /// `hv_timeout`.
    pub fn start(
        ram: MachineRam,
        backends: Backends,
        wait: Duration,
        hv_timeout: Duration,
    ) -> Self {
        let shared = Arc::new(Shared {
            dm: Mutex::new(None),
            stop: AtomicBool::new(false),
            failed: Mutex::new(None),
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                if let Err(e) = run(&s, ram, &backends, wait, hv_timeout) {
                    tracing::error!("devices: {e}");
                    *s.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            })
            .expect("spawning the device model thread");
        Self {
            shared,
            handle: Some(handle),
        }
    }

    /// Why the device model stopped or never started, if it did.
    pub fn failed(&self) -> Option<String> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The device model's counters (zero before it started).
    pub fn stats(&self) -> Stats {
        lock(&self.shared.dm)
            .as_ref()
            .map(DeviceModel::stats)
            .unwrap_or_default()
    }

    /// Stop serving and wait for the thread.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    s: &Shared,
    ram: MachineRam,
    backends: &Backends,
    wait: Duration,
    hv_timeout: Duration,
) -> Result<(), String> {
    let area =
        dm::wait_for_area(ram, wait, Duration::from_secs(5), &s.stop).map_err(|e| e.to_string())?;
    if s.stop.load(Ordering::Relaxed) {
        return Ok(());
    }
    let model = DeviceModel::replicated(area, backends).map_err(|e| e.to_string())?;
    let mut pace = Pace::new(model.area().hv_alive(), hv_timeout);
    *lock(&s.dm) = Some(model);
    while !s.stop.load(Ordering::Relaxed) {
        let (busy, hv) = {
            let mut g = lock(&s.dm);
            let m = g.as_mut().expect("set above");
            (m.step(), m.area().hv_alive())
        };
        // The lock is free while the loop backs off.
        if !pace.after(busy, hv) {
            // Nothing held may go out now: no epoch commits any more.
            if let Some(m) = lock(&s.dm).as_mut() {
                m.discard_uncommitted();
            }
            return Err(format!(
                "the hypervisor's liveness word stood still for {} s: the machine is gone",
                hv_timeout.as_secs()
            ));
        }
    }
    Ok(())
}

impl DeviceThread {
    fn with<T>(&self, f: impl FnOnce(&mut DeviceModel) -> T) -> Option<T> {
        lock(&self.shared.dm).as_mut().map(f)
    }
}

impl EpochDevices for DeviceThread {
    fn sealed(&self, epoch: u64, limit: Duration) -> Result<SealedDevices, String> {
        let t = Instant::now();
        loop {
            if let Some(Some((state, disk))) = self.with(|m| m.take_sealed(epoch)) {
                return Ok(SealedDevices { state, disk });
            }
            if let Some(why) = self.failed() {
                return Err(format!("the device model stopped: {why}"));
            }
            if t.elapsed() >= limit {
                return Err(format!(
                    "the device model sealed no state for epoch {epoch} within {} s",
                    limit.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn whole_disk(&self) -> Result<Vec<DiskWrite>, String> {
        self.with(|m| m.whole_disk())
            .unwrap_or_else(|| Ok(Vec::new()))
            .map_err(|e| format!("reading the disk for the initial sync: {e}"))
    }

    fn committed(&self, epoch: u64) {
        self.with(|m| m.commit(epoch));
    }

    fn held_frames(&self) -> usize {
        self.with(|m| m.held_frames()).unwrap_or(0)
    }
}
