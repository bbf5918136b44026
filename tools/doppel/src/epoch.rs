//! One epoch as plain values, how to write it, and a plain model of what a
//! replica looks like after a sequence of epochs (the oracle the tests
//! compare the real backup path against).

use std::io::{self, Write};

use crate::stream::{HvmParam, OutPage, StreamWriter, TscInfo, PAGE_SIZE};

/// Everything one epoch carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochData {
    /// Pages in send order: pfn and contents (`None` = invalid pfn).
    pub pages: Vec<(u64, Option<Vec<u8>>)>,
    pub tsc: TscInfo,
    /// HVM context blob (opaque here; must not be empty).
    pub hvm_context: Vec<u8>,
    pub params: Vec<HvmParam>,
}

impl EpochData {
    /// The epoch's pages as the stream writer takes them.
    pub fn out_pages(&self) -> Vec<OutPage<'_>> {
        self.pages
            .iter()
            .map(|(pfn, d)| OutPage {
                pfn: *pfn,
                data: d.as_deref(),
            })
            .collect()
    }

    /// Write the epoch's records: PAGE_DATA*, X86_TSC_INFO, HVM_CONTEXT,
    /// HVM_PARAMS, then CHECKPOINT if `checkpoint`.
    pub fn write<W: Write>(&self, w: &mut StreamWriter<W>, checkpoint: bool) -> io::Result<()> {
        w.page_data(&self.out_pages())?;
        w.tsc_info(&self.tsc)?;
        w.hvm_context(&self.hvm_context)?;
        w.hvm_params(&self.params)?;
        if checkpoint {
            w.checkpoint()?;
        }
        Ok(())
    }
}

/// What a replica holds after its last committed epoch, built the obvious
/// way. The real replica must always equal one of these, byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelReplica {
    pub memory: Vec<u8>,
    pub hvm_context: Vec<u8>,
    pub tsc: Option<TscInfo>,
    pub params: Vec<HvmParam>,
    /// Number of committed epochs.
    pub committed: u64,
}

impl ModelReplica {
    pub fn new(pages: u64) -> Self {
        Self {
            memory: vec![0; pages as usize * PAGE_SIZE],
            hvm_context: Vec::new(),
            tsc: None,
            params: Vec::new(),
            committed: 0,
        }
    }

    /// Apply one whole epoch. Invalid pfns become zero pages.
    pub fn apply(&mut self, e: &EpochData) {
        for (pfn, d) in &e.pages {
            let at = *pfn as usize * PAGE_SIZE;
            let dst = &mut self.memory[at..at + PAGE_SIZE];
            match d {
                Some(d) => dst.copy_from_slice(d),
                None => dst.fill(0),
            }
        }
        self.tsc = Some(e.tsc);
        self.hvm_context = e.hvm_context.clone();
        self.params = e.params.clone();
        self.committed += 1;
    }

    /// Model after the first `n` of `epochs`.
    pub fn after(pages: u64, epochs: &[EpochData], n: usize) -> Self {
        let mut m = Self::new(pages);
        for e in &epochs[..n] {
            m.apply(e);
        }
        m
    }
}
