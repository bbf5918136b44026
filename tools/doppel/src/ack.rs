//! The back channel, backup -> primary: epoch acknowledgements framed as a
//! libxl stream (COLO's back channel framing).
//!
//! Layout (docs/STREAM.md): libxl header (ident "LibxlFmt", version 2,
//! options 0), then per committed epoch N
//!   DOPPEL_EPOCH_ACK  (optional type 0x80D00001, body: u64 N, u64 0)
//!   CHECKPOINT_STATE  (type 5, body: u32 control id 2 = SVM_READY)
//! and END when the backup closes the channel. A Xen-only reader skips the
//! optional record and sees COLO's "secondary ready" state.

use crate::stream::reader::{read_record_header, value_then_reserved};
use std::io::{self, Read, Write};

use zerocopy::{FromBytes, IntoBytes};

use crate::stream::error::{RecCtx, StreamError};
use crate::stream::format::{
    control, libxl_rec, padded, LibxlHeader, RecordHeader, LIBXL_IDENT, LIBXL_VERSION,
    REC_TYPE_OPTIONAL, SESSION_NONCE_LEN,
};

/// Largest back channel record body accepted (they are all tiny).
pub const MAX_ACK_BODY: u32 = 4096;

/// Writes the back channel.
pub struct AckWriter<W> {
    w: W,
}

fn rec_bytes(rtype: u32, body: &[u8], out: &mut Vec<u8>) {
    let h = RecordHeader {
        rtype: rtype.into(),
        length: (body.len() as u32).into(),
    };
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(body);
    out.resize(out.len() + padded(body.len()) - body.len(), 0);
}

impl<W: Write> AckWriter<W> {
    /// Write the libxl header.
    pub fn new(mut w: W) -> io::Result<Self> {
        let h = LibxlHeader {
            ident: LIBXL_IDENT.into(),
            version: LIBXL_VERSION.into(),
            options: 0.into(),
        };
        w.write_all(h.as_bytes())?;
        Ok(Self { w })
    }

    /// Acknowledge that epoch `epoch` is committed on the backup.
    pub fn ack(&mut self, epoch: u64) -> io::Result<()> {
        let mut out = Vec::with_capacity(48);
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&epoch.to_le_bytes());
        rec_bytes(libxl_rec::DOPPEL_EPOCH_ACK, &body, &mut out);
        rec_bytes(
            libxl_rec::CHECKPOINT_STATE,
            &control::SVM_READY.to_le_bytes(),
            &mut out,
        );
        self.w.write_all(&out)?;
        self.w.flush()
    }

    /// Answer the primary's DOPPEL_HELLO with the accepted feature bits
    /// (first record of the channel, before any ack).
    pub fn features(&mut self, accepted: u64) -> io::Result<()> {
        let mut out = Vec::with_capacity(24);
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&accepted.to_le_bytes());
        rec_bytes(libxl_rec::DOPPEL_FEATURES, &body, &mut out);
        self.w.write_all(&out)?;
        self.w.flush()
    }

    /// Send the session nonce (first record of the channel, TLS links
    /// only); the primary must echo it as its stream's first record.
    pub fn session(&mut self, nonce: &[u8; SESSION_NONCE_LEN]) -> io::Result<()> {
        let mut out = Vec::with_capacity(8 + SESSION_NONCE_LEN);
        rec_bytes(libxl_rec::DOPPEL_SESSION, nonce, &mut out);
        self.w.write_all(&out)?;
        self.w.flush()
    }

    /// Close the channel with END.
    pub fn end(mut self) -> io::Result<W> {
        let mut out = Vec::new();
        rec_bytes(libxl_rec::END, &[], &mut out);
        self.w.write_all(&out)?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// A message on the back channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackMsg {
    /// The backup committed this epoch.
    Ack(u64),
    /// A bare checkpoint state other than SVM_READY (NEW, SVM_SUSPENDED,
    /// SVM_RESUMED).
    State(u32),
    /// The backup's answer to DOPPEL_HELLO: the feature bits it accepts
    /// (only as the first record).
    Features(u64),
    /// The backup's session nonce (TLS links; only as the first record).
    Session([u8; SESSION_NONCE_LEN]),
    /// The backup closed the channel.
    End,
}

/// Reads and validates the back channel.
pub struct AckReader<R> {
    r: R,
    offset: u64,
    index: u64,
    /// The epoch the next ack must carry.
    next_epoch: u64,
    /// Epoch from a DOPPEL_EPOCH_ACK awaiting its CHECKPOINT_STATE.
    pending: Option<(u64, RecCtx)>,
    ended: bool,
    /// Record #0 was DOPPEL_SESSION.
    session: bool,
}

impl<R: Read> AckReader<R> {
    /// Read the libxl header; the first ack must be for `first_epoch`.
    pub fn open(mut r: R, first_epoch: u64) -> Result<Self, StreamError> {
        let mut hb = [0u8; 16];
        r.read_exact(&mut hb)
            .map_err(|e| StreamError::from_io(e, "libxl header", 0))?;
        let h = LibxlHeader::read_from_bytes(&hb).expect("16 bytes");
        if h.ident.get() != LIBXL_IDENT {
            return Err(StreamError::BadLibxlIdent(h.ident.get()));
        }
        if h.version.get() != LIBXL_VERSION {
            return Err(StreamError::BadLibxlVersion(h.version.get()));
        }
        if h.options.get() != 0 {
            return Err(StreamError::LibxlOptions(h.options.get()));
        }
        Ok(Self {
            r,
            offset: 16,
            index: 0,
            next_epoch: first_epoch,
            pending: None,
            ended: false,
            session: false,
        })
    }

    /// The epoch the next ack must carry.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// The next message.
    pub fn next_msg(&mut self) -> Result<BackMsg, StreamError> {
        loop {
            if self.ended {
                return Err(StreamError::AfterEnd);
            }
            let (rec, len) = read_record_header(
                &mut self.r,
                &mut self.offset,
                &mut self.index,
                true,
                MAX_ACK_BODY,
                "back channel record header",
            )?;
            let known = matches!(
                rec.rtype,
                libxl_rec::END
                    | libxl_rec::CHECKPOINT_STATE
                    | libxl_rec::DOPPEL_EPOCH_ACK
                    | libxl_rec::DOPPEL_FEATURES
                    | libxl_rec::DOPPEL_SESSION
            );
            if !known && rec.rtype & REC_TYPE_OPTIONAL == 0 {
                return Err(if rec.rtype <= 4 {
                    StreamError::Unsupported { rec }
                } else {
                    StreamError::UnknownMandatory { rec }
                });
            }
            let mut body = vec![0u8; padded(len as usize)];
            self.r
                .read_exact(&mut body)
                .map_err(|e| StreamError::from_io(e, "back channel record body", self.offset))?;
            self.offset += body.len() as u64;
            if let Some((at, &value)) = body[len as usize..]
                .iter()
                .enumerate()
                .find(|(_, &b)| b != 0)
            {
                return Err(StreamError::NonZeroPadding {
                    rec,
                    at: len as usize + at,
                    value,
                });
            }
            body.truncate(len as usize);
            let bad_len = |expected: &str| StreamError::BadLength {
                rec,
                length: u64::from(len),
                expected: expected.into(),
            };
            let bad_ack = |msg: String| StreamError::BadAck { rec, msg };
            match rec.rtype {
                libxl_rec::DOPPEL_SESSION => {
                    if body.len() != SESSION_NONCE_LEN {
                        return Err(bad_len("32"));
                    }
                    if rec.index != 0 {
                        return Err(bad_ack(
                            "DOPPEL_SESSION is only allowed as the first record".into(),
                        ));
                    }
                    self.session = true;
                    let mut n = [0u8; SESSION_NONCE_LEN];
                    n.copy_from_slice(&body);
                    return Ok(BackMsg::Session(n));
                }
                libxl_rec::DOPPEL_FEATURES => {
                    if body.len() != 16 {
                        return Err(bad_len("16"));
                    }
                    if rec.index != u64::from(self.session) {
                        return Err(bad_ack(
                            "DOPPEL_FEATURES is only allowed as the first record \
                             (after DOPPEL_SESSION)"
                                .into(),
                        ));
                    }
                    return Ok(BackMsg::Features(value_then_reserved(rec, &body)?));
                }
                libxl_rec::DOPPEL_EPOCH_ACK => {
                    if body.len() != 16 {
                        return Err(bad_len("16"));
                    }
                    let epoch = value_then_reserved(rec, &body)?;
                    if let Some((e, _)) = self.pending {
                        return Err(bad_ack(format!(
                            "second epoch ack before the CHECKPOINT_STATE of epoch {e}"
                        )));
                    }
                    if epoch != self.next_epoch {
                        return Err(bad_ack(format!(
                            "ack for epoch {epoch}, expected epoch {}",
                            self.next_epoch
                        )));
                    }
                    self.pending = Some((epoch, rec));
                }
                libxl_rec::CHECKPOINT_STATE => {
                    if body.len() != 4 {
                        return Err(bad_len("4"));
                    }
                    let id = u32::from_le_bytes(body[..].try_into().expect("4"));
                    if id > control::SVM_RESUMED {
                        return Err(StreamError::BadControlId { rec, id });
                    }
                    match (self.pending.take(), id) {
                        (Some((e, _)), control::SVM_READY) => {
                            self.next_epoch = e + 1;
                            return Ok(BackMsg::Ack(e));
                        }
                        (Some((e, _)), _) => {
                            return Err(bad_ack(format!(
                                "epoch {e} ack followed by control id {id}, expected SVM_READY (2)"
                            )))
                        }
                        (None, control::SVM_READY) => {
                            return Err(bad_ack(
                                "SVM_READY without a preceding DOPPEL_EPOCH_ACK".into(),
                            ))
                        }
                        (None, id) => return Ok(BackMsg::State(id)),
                    }
                }
                libxl_rec::END => {
                    if !body.is_empty() {
                        return Err(bad_len("0"));
                    }
                    if let Some((e, _)) = self.pending {
                        return Err(bad_ack(format!(
                            "END while the ack of epoch {e} lacks its CHECKPOINT_STATE"
                        )));
                    }
                    self.ended = true;
                    return Ok(BackMsg::End);
                }
                _ => {
                    // Unknown optional record: skipped, but not between an
                    // epoch ack and its state.
                    if let Some((e, _)) = self.pending {
                        return Err(bad_ack(format!(
                            "record between the ack of epoch {e} and its CHECKPOINT_STATE"
                        )));
                    }
                }
            }
        }
    }
}
