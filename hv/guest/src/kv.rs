//! The protected service: a key-value / counter server (`hv/abi`
//! `service`), run forever over the `RECV`/`SEND` hypercalls.
//!
//! All of its state is in guest memory, spread over pages of the workload
//! region, so a checkpoint of memory and vCPU carries it whole:
//! - page 0: the header (version = requests applied, state checksum);
//! - page 1: the reply cache, [`REPLAY_WINDOW`] replies by `id % window`;
//! - page 2: the receive buffer; page 3: error replies;
//! - page 4 + k: the value of key k.

use doppel_abi::guest::{hypercall, MAX_RECORD, PAGE_SIZE, SEND_AGAIN};
use doppel_abi::service::{decide, term, Outcome, Reply, MAX_KEYS, REPLAY_WINDOW};

use crate::{print, print_u64, read_u64, write_u64, Guest};

const HEADER: u64 = 0;
const CACHE: u64 = 1;
const RX: u64 = 2;
const ERR: u64 = 3;
const KEYS: u64 = 4;

/// Offsets in the header page.
const VERSION: u64 = 0;
const CHECKSUM: u64 = 8;

struct Kv {
    base: u64,
    keys: u64,
}

impl Kv {
    fn page(&self, p: u64) -> u64 {
        self.base + p * PAGE_SIZE
    }

    fn value_gpa(&self, key: u64) -> u64 {
        self.page(KEYS + key)
    }

    fn cache_gpa(&self, id: u64) -> u64 {
        self.page(CACHE) + (id % REPLAY_WINDOW) * core::mem::size_of::<Reply>() as u64
    }

    fn write_reply(gpa: u64, r: &Reply) {
        let words: [u64; 6] = [
            u64::from(r.magic) | u64::from(r.status) << 32,
            r.id,
            r.value,
            r.version,
            r.checksum,
            r.reserved,
        ];
        for (i, w) in words.iter().enumerate() {
            write_u64(gpa + i as u64 * 8, *w);
        }
    }

    fn read_reply(gpa: u64) -> Reply {
        let w0 = read_u64(gpa);
        Reply {
            magic: w0 as u32,
            status: (w0 >> 32) as u32,
            id: read_u64(gpa + 8),
            value: read_u64(gpa + 16),
            version: read_u64(gpa + 24),
            checksum: read_u64(gpa + 32),
            reserved: read_u64(gpa + 40),
        }
    }

    /// Answer one received frame (per `service::decide`); returns where
    /// the reply is: its cache slot if the request was applied, else the
    /// error reply page.
    fn handle(&self, frame: &[u8]) -> u64 {
        let version = read_u64(self.page(HEADER) + VERSION);
        let checksum = read_u64(self.page(HEADER) + CHECKSUM);
        let value = |key| read_u64(self.value_gpa(key));
        let cached = |id| Self::read_reply(self.cache_gpa(id));
        match decide(frame, self.keys, version, checksum, value, cached) {
            Outcome::Apply { key, reply } => {
                write_u64(self.value_gpa(key), reply.value);
                write_u64(self.page(HEADER) + CHECKSUM, reply.checksum);
                write_u64(self.page(HEADER) + VERSION, reply.version);
                let at = self.cache_gpa(reply.id);
                Self::write_reply(at, &reply);
                at
            }
            Outcome::Answer(reply) => {
                let gpa = self.page(ERR);
                Self::write_reply(gpa, &reply);
                gpa
            }
        }
    }
}

/// Serve forever. Returns only on a hypervisor error (the caller reports
/// it with DONE).
pub fn serve(g: &Guest, work_start: u64, work_pages: u64, keys: u32) -> u64 {
    let keys = u64::from(keys.min(MAX_KEYS));
    if keys == 0 || KEYS + keys > work_pages {
        print("guest: kv: keys do not fit the workload region\n");
        return 10;
    }
    let kv = Kv {
        base: work_start,
        keys,
    };
    // Every value starts at 0 (RAM is cleared at load).
    let sum = (0..keys).fold(0u64, |a, k| a.wrapping_add(term(k, 0)));
    write_u64(kv.page(HEADER) + VERSION, 0);
    write_u64(kv.page(HEADER) + CHECKSUM, sum);
    print("guest: kv service ready, keys ");
    print_u64(keys);
    print("\n");
    let rx = kv.page(RX);
    let mut frame = [0u8; MAX_RECORD as usize];
    loop {
        let n = g.hypercall(hypercall::RECV, rx, MAX_RECORD, 0);
        if n == 0 {
            continue;
        }
        if n > MAX_RECORD {
            print("guest: kv: RECV failed\n");
            return 11;
        }
        for (i, b) in frame.iter_mut().take(n as usize).enumerate() {
            // SAFETY: `rx + i` is inside the receive buffer page the
            // hypervisor just filled (n <= MAX_RECORD < PAGE_SIZE).
            *b = unsafe { core::ptr::read_volatile((rx + i as u64) as *const u8) };
        }
        let at = kv.handle(&frame[..n as usize]);
        loop {
            match g.hypercall(hypercall::SEND, at, core::mem::size_of::<Reply>() as u64, 0) {
                0 => break,
                SEND_AGAIN => continue,
                _ => {
                    print("guest: kv: SEND failed\n");
                    return 12;
                }
            }
        }
    }
}
