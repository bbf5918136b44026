//! The instruction behind an MMIO exit, decoded with `iced-x86`.
//!
//! An MMIO exit (an NPT/EPT fault on a page no RAM backs) tells the
//! hypervisor the guest-physical address but not what the guest was doing
//! there: QEMU's SVM model has no decode assists and no NRIP save. The
//! caller fetches up to 15 bytes at the guest's RIP through its page walk
//! and asks `decode_mmio` what the one instruction does: the access size,
//! read or write, which register (or immediate) is the data, and how long
//! the instruction is (the RIP advance).
//!
//! Accepted: the MOV forms Linux's MMIO accessors compile to (`readb/w/l/q`,
//! `writeb/w/l/q`, `ioread*`/`iowrite*`):
//! - `mov r/m, reg` (88, 89) and `mov reg, r/m` (8A, 8B), with 66/REX;
//! - `mov r/m, imm` (C6 /0, C7 /0; the 64-bit form sign-extends imm32);
//! - `movzx` (0F B6, 0F B7) and `movsx`/`movsxd` (0F BE, 0F BF, 63) reads;
//! - `mov` with a moffs address (A0-A3).
//!
//! Refused, with an error naming the reason (the caller stops the guest or
//! injects #UD; it never guesses): string moves and stores (`movs`, `stos`,
//! any `rep` form: `memcpy_toio` on MMIO is not a path Linux's drivers for
//! this platform use), read-modify-write instructions (`add`, `or`, `xchg`,
//! `cmpxchg`, `bts`, ...), LOCK-prefixed instructions, SSE/AVX moves, a MOV
//! whose operand is not memory (it cannot fault on MMIO), and anything the
//! decoder calls invalid or that runs past the bytes given.

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction, OpKind, Register};

/// The processor mode the instruction was fetched in (the code segment's
/// default operand and address size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Bits16,
    Bits32,
    Bits64,
}

impl Mode {
    fn bitness(self) -> u32 {
        match self {
            Mode::Bits16 => 16,
            Mode::Bits32 => 32,
            Mode::Bits64 => 64,
        }
    }
}

/// Which way the data goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The guest reads the device: the value goes into `Operand::Reg`.
    Read,
    /// The guest writes the device: the value comes from the operand.
    Write,
}

/// A general-purpose register or a part of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpr {
    /// 0 = RAX, 1 = RCX, 2 = RDX, 3 = RBX, 4 = RSP, 5 = RBP, 6 = RSI,
    /// 7 = RDI, 8..=15 = R8..R15 (the hardware encoding).
    pub index: u8,
    /// Width in bytes: 1, 2, 4 or 8.
    pub width: u8,
    /// AH/CH/DH/BH: bits 15:8 of register `index` (0..=3).
    pub high8: bool,
}

/// The register or immediate that holds (or receives) the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    Reg(Gpr),
    /// A write's immediate, already extended to the access size.
    Imm(u64),
}

/// How a read narrower than its destination register fills the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extension {
    /// Plain `mov`: same width as the register.
    None,
    /// `movzx`.
    Zero,
    /// `movsx`/`movsxd`.
    Sign,
}

/// One decoded MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioOp {
    /// Instruction length in bytes: the RIP advance once emulated.
    pub len: u8,
    /// Bytes accessed on the device: 1, 2, 4 or 8.
    pub size: u8,
    pub dir: Direction,
    pub operand: Operand,
    pub extend: Extension,
}

/// Why an instruction is not emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioError {
    /// The bytes end before the instruction does.
    Truncated,
    /// Not a valid instruction in this mode.
    Invalid,
    /// A valid instruction outside the accepted MOV forms.
    Unsupported,
    /// A LOCK or REP prefix on an otherwise accepted form.
    Prefix,
    /// An accepted MOV form whose r/m operand is a register, not memory.
    NoMemoryOperand,
}

impl MmioError {
    /// Short text for the hypervisor's error line.
    pub fn as_str(self) -> &'static str {
        match self {
            MmioError::Truncated => "instruction runs past the fetched bytes",
            MmioError::Invalid => "invalid instruction",
            MmioError::Unsupported => "not a MOV form the MMIO emulation accepts",
            MmioError::Prefix => "LOCK/REP prefix on an MMIO access",
            MmioError::NoMemoryOperand => "no memory operand",
        }
    }
}

/// The first instruction of `bytes`, or why it is not one.
fn first(bytes: &[u8], mode: Mode) -> Result<Instruction, MmioError> {
    let mut decoder = Decoder::try_with_ip(mode.bitness(), bytes, 0, DecoderOptions::NONE)
        .map_err(|_| MmioError::Invalid)?;
    let ins = decoder.decode();
    if ins.is_invalid() {
        return Err(match decoder.last_error() {
            DecoderError::NoMoreBytes => MmioError::Truncated,
            _ => MmioError::Invalid,
        });
    }
    Ok(ins)
}

/// Decodes the first instruction of `bytes` as an MMIO access.
pub fn decode_mmio(bytes: &[u8], mode: Mode) -> Result<MmioOp, MmioError> {
    let ins = first(bytes, mode)?;
    let (dir, size, extend) = form(ins.code()).ok_or(MmioError::Unsupported)?;
    if ins.has_lock_prefix() || ins.has_rep_prefix() || ins.has_repne_prefix() {
        return Err(MmioError::Prefix);
    }
    let (mem, other) = match dir {
        Direction::Write => (0, 1),
        Direction::Read => (1, 0),
    };
    if ins.op_kind(mem) != OpKind::Memory {
        return Err(MmioError::NoMemoryOperand);
    }
    let operand = match ins.op_kind(other) {
        OpKind::Register => {
            Operand::Reg(gpr(ins.op_register(other)).ok_or(MmioError::Unsupported)?)
        }
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate32to64 => Operand::Imm(ins.immediate(other) & mask(size)),
        _ => return Err(MmioError::Unsupported),
    };
    let len = u8::try_from(ins.len()).map_err(|_| MmioError::Invalid)?;
    Ok(MmioOp {
        len,
        size,
        dir,
        operand,
        extend,
    })
}

/// A decoded `mov crN, reg` (0F 22 /r): the control register, the source
/// general register (hardware index) and the instruction length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MovToCr {
    pub cr: u8,
    pub gpr: u8,
    pub len: u8,
}

/// Decodes the first instruction of `bytes` as a MOV to a control
/// register (what an SVM CR-write intercept without decode assists needs).
pub fn decode_mov_to_cr(bytes: &[u8], mode: Mode) -> Result<MovToCr, MmioError> {
    let ins = first(bytes, mode)?;
    if !matches!(ins.code(), Code::Mov_cr_r32 | Code::Mov_cr_r64) {
        return Err(MmioError::Unsupported);
    }
    let cr = (ins.op_register(0) as u32).wrapping_sub(Register::CR0 as u32);
    let src = gpr(ins.op_register(1)).ok_or(MmioError::Unsupported)?;
    Ok(MovToCr {
        cr: u8::try_from(cr).map_err(|_| MmioError::Unsupported)?,
        gpr: src.index,
        len: u8::try_from(ins.len()).map_err(|_| MmioError::Invalid)?,
    })
}

/// The accepted forms: direction, device access size, extension.
fn form(code: Code) -> Option<(Direction, u8, Extension)> {
    use Direction::{Read, Write};
    use Extension::{None as Plain, Sign, Zero};
    Some(match code {
        Code::Mov_rm8_r8 | Code::Mov_moffs8_AL | Code::Mov_rm8_imm8 => (Write, 1, Plain),
        Code::Mov_rm16_r16 | Code::Mov_moffs16_AX | Code::Mov_rm16_imm16 => (Write, 2, Plain),
        Code::Mov_rm32_r32 | Code::Mov_moffs32_EAX | Code::Mov_rm32_imm32 => (Write, 4, Plain),
        Code::Mov_rm64_r64 | Code::Mov_moffs64_RAX | Code::Mov_rm64_imm32 => (Write, 8, Plain),
        Code::Mov_r8_rm8 | Code::Mov_AL_moffs8 => (Read, 1, Plain),
        Code::Mov_r16_rm16 | Code::Mov_AX_moffs16 => (Read, 2, Plain),
        Code::Mov_r32_rm32 | Code::Mov_EAX_moffs32 => (Read, 4, Plain),
        Code::Mov_r64_rm64 | Code::Mov_RAX_moffs64 => (Read, 8, Plain),
        Code::Movzx_r16_rm8 | Code::Movzx_r32_rm8 | Code::Movzx_r64_rm8 => (Read, 1, Zero),
        Code::Movzx_r16_rm16 | Code::Movzx_r32_rm16 | Code::Movzx_r64_rm16 => (Read, 2, Zero),
        Code::Movsx_r16_rm8 | Code::Movsx_r32_rm8 | Code::Movsx_r64_rm8 => (Read, 1, Sign),
        Code::Movsx_r16_rm16 | Code::Movsx_r32_rm16 | Code::Movsx_r64_rm16 => (Read, 2, Sign),
        Code::Movsxd_r64_rm32 => (Read, 4, Sign),
        _ => return None,
    })
}

/// A general-purpose register as index, width and high-byte flag; `None`
/// for any other register (segment, control, vector).
fn gpr(reg: Register) -> Option<Gpr> {
    let n = reg as u32;
    let (al, ah, spl, ax, eax, rax, r15) = (
        Register::AL as u32,
        Register::AH as u32,
        Register::SPL as u32,
        Register::AX as u32,
        Register::EAX as u32,
        Register::RAX as u32,
        Register::R15 as u32,
    );
    let (index, width, high8) = if (al..ah).contains(&n) {
        (n - al, 1, false)
    } else if (ah..spl).contains(&n) {
        (n - ah, 1, true)
    } else if (spl..ax).contains(&n) {
        (n - spl + 4, 1, false)
    } else if (ax..eax).contains(&n) {
        (n - ax, 2, false)
    } else if (eax..rax).contains(&n) {
        (n - eax, 4, false)
    } else if (rax..=r15).contains(&n) {
        (n - rax, 8, false)
    } else {
        return None;
    };
    Some(Gpr {
        index: u8::try_from(index).ok()?,
        width,
        high8,
    })
}

fn mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

impl MmioOp {
    /// The value a write sends to the device, given the full 64-bit value
    /// of the source register (`regs[index]`); immediates ignore it.
    pub fn write_value(&self, source_reg: u64) -> u64 {
        match self.operand {
            Operand::Imm(v) => v,
            Operand::Reg(r) if r.high8 => (source_reg >> 8) & 0xff,
            Operand::Reg(_) => source_reg & mask(self.size),
        }
    }

    /// The destination register's new 64-bit value after a read that
    /// returned `data` (`size` bytes): sub-32-bit destinations keep their
    /// upper bits, 32-bit ones clear bits 63:32 (as the CPU does in 64-bit
    /// mode), `movzx`/`movsx` extend to the register width. `None` for a
    /// write or an immediate.
    pub fn read_merge(&self, old: u64, data: u64) -> Option<u64> {
        let Operand::Reg(r) = self.operand else {
            return None;
        };
        if self.dir != Direction::Read {
            return None;
        }
        let data = data & mask(self.size);
        let value = match self.extend {
            Extension::None | Extension::Zero => data,
            Extension::Sign => {
                let shift = 64 - 8 * u32::from(self.size);
                (((data << shift) as i64) >> shift) as u64
            }
        };
        Some(match (r.width, r.high8) {
            (1, true) => (old & !0xff00) | ((value & 0xff) << 8),
            (1, false) => (old & !0xff) | (value & 0xff),
            (2, _) => (old & !0xffff) | (value & 0xffff),
            (4, _) => value & 0xffff_ffff,
            _ => value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mov_to_cr_is_decoded_with_its_register() {
        // mov cr4, rax (64-bit); mov cr4, eax (32-bit, Linux's PVH entry);
        // mov cr4, r9 (REX.B); mov cr0, rdx.
        let cases: [(&[u8], Mode, MovToCr); 4] = [
            (
                &[0x0f, 0x22, 0xe0],
                Mode::Bits64,
                MovToCr {
                    cr: 4,
                    gpr: 0,
                    len: 3,
                },
            ),
            (
                &[0x0f, 0x22, 0xe0],
                Mode::Bits32,
                MovToCr {
                    cr: 4,
                    gpr: 0,
                    len: 3,
                },
            ),
            (
                &[0x41, 0x0f, 0x22, 0xe1],
                Mode::Bits64,
                MovToCr {
                    cr: 4,
                    gpr: 9,
                    len: 4,
                },
            ),
            (
                &[0x0f, 0x22, 0xc2],
                Mode::Bits64,
                MovToCr {
                    cr: 0,
                    gpr: 2,
                    len: 3,
                },
            ),
        ];
        for (bytes, mode, want) in cases {
            assert_eq!(decode_mov_to_cr(bytes, mode), Ok(want), "{bytes:02x?}");
        }
        // mov rax, cr4 is a read, not a write; a plain mov is not a CR form.
        assert_eq!(
            decode_mov_to_cr(&[0x0f, 0x20, 0xe0], Mode::Bits64),
            Err(MmioError::Unsupported)
        );
        assert_eq!(
            decode_mov_to_cr(&[0x89, 0x07], Mode::Bits64),
            Err(MmioError::Unsupported)
        );
        assert_eq!(
            decode_mov_to_cr(&[0x0f, 0x22], Mode::Bits64),
            Err(MmioError::Truncated)
        );
    }
    use proptest::prelude::*;

    fn reg(index: u8, width: u8) -> Operand {
        Operand::Reg(Gpr {
            index,
            width,
            high8: false,
        })
    }

    fn ok(bytes: &[u8]) -> MmioOp {
        decode_mmio(bytes, Mode::Bits64).expect("decodes")
    }

    #[test]
    fn linux_writes() {
        // mov [rdi], eax            (writel)
        let op = ok(&[0x89, 0x07]);
        assert_eq!(
            (op.len, op.size, op.dir, op.operand),
            (2, 4, Direction::Write, reg(0, 4))
        );
        // mov [rax+0x10], r9b       (writeb)
        let op = ok(&[0x44, 0x88, 0x48, 0x10]);
        assert_eq!(
            (op.len, op.size, op.dir, op.operand),
            (4, 1, Direction::Write, reg(9, 1))
        );
        // mov [rdx], si             (writew)
        let op = ok(&[0x66, 0x89, 0x32]);
        assert_eq!((op.len, op.size, op.operand), (3, 2, reg(6, 2)));
        // mov [rcx+0x300], r12      (writeq)
        let op = ok(&[0x4c, 0x89, 0xa1, 0x00, 0x03, 0x00, 0x00]);
        assert_eq!((op.len, op.size, op.operand), (7, 8, reg(12, 8)));
        // mov [rbx], ah
        let op = ok(&[0x88, 0x23]);
        let ah = Gpr {
            index: 0,
            width: 1,
            high8: true,
        };
        assert_eq!((op.size, op.operand), (1, Operand::Reg(ah)));
        assert_eq!(op.write_value(0x1234), 0x12);
    }

    #[test]
    fn immediate_writes() {
        // mov dword [rax], 0x12345678
        let op = ok(&[0xc7, 0x00, 0x78, 0x56, 0x34, 0x12]);
        assert_eq!((op.len, op.size, op.dir), (6, 4, Direction::Write));
        assert_eq!(op.operand, Operand::Imm(0x1234_5678));
        // mov byte [rdi+4], 0x80
        let op = ok(&[0xc6, 0x47, 0x04, 0x80]);
        assert_eq!((op.len, op.size, op.operand), (4, 1, Operand::Imm(0x80)));
        // mov word [rsi], 0xbeef
        let op = ok(&[0x66, 0xc7, 0x06, 0xef, 0xbe]);
        assert_eq!((op.len, op.size, op.operand), (5, 2, Operand::Imm(0xbeef)));
        // mov qword [rax], -1       (imm32 sign-extended to 64 bits)
        let op = ok(&[0x48, 0xc7, 0x00, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            (op.len, op.size, op.operand),
            (7, 8, Operand::Imm(u64::MAX))
        );
        assert_eq!(op.write_value(0), u64::MAX);
    }

    #[test]
    fn linux_reads() {
        // mov eax, [rdi]            (readl)
        let op = ok(&[0x8b, 0x07]);
        assert_eq!(
            (op.len, op.size, op.dir, op.operand),
            (2, 4, Direction::Read, reg(0, 4))
        );
        assert_eq!(
            op.read_merge(u64::MAX, 0xdead_beef),
            Some(0xdead_beef),
            "32-bit clears 63:32"
        );
        // mov r8, [rsi+8]           (readq)
        let op = ok(&[0x4c, 0x8b, 0x46, 0x08]);
        assert_eq!((op.len, op.size, op.operand), (4, 8, reg(8, 8)));
        // mov dl, [rax]             (readb)
        let op = ok(&[0x8a, 0x10]);
        assert_eq!((op.size, op.operand), (1, reg(2, 1)));
        assert_eq!(
            op.read_merge(0x1111_2222_3333_4444, 0x1ff),
            Some(0x1111_2222_3333_44ff)
        );
        // mov cx, [rdx]             (readw)
        let op = ok(&[0x66, 0x8b, 0x0a]);
        assert_eq!(op.read_merge(0xaaaa_0000, 0x1234), Some(0xaaaa_1234));
        // movzx eax, byte [rdi]
        let op = ok(&[0x0f, 0xb6, 0x07]);
        assert_eq!(
            (op.len, op.size, op.extend, op.operand),
            (3, 1, Extension::Zero, reg(0, 4))
        );
        assert_eq!(op.read_merge(u64::MAX, 0x80), Some(0x80));
        // movzx eax, word [rdi]
        let op = ok(&[0x0f, 0xb7, 0x07]);
        assert_eq!((op.size, op.extend), (2, Extension::Zero));
        // movsx rax, byte [rdi]
        let op = ok(&[0x48, 0x0f, 0xbe, 0x07]);
        assert_eq!(
            (op.size, op.extend, op.operand),
            (1, Extension::Sign, reg(0, 8))
        );
        assert_eq!(op.read_merge(0, 0x80), Some(0xffff_ffff_ffff_ff80));
        // movsx ecx, word [rbx]
        let op = ok(&[0x0f, 0xbf, 0x0b]);
        assert_eq!(op.read_merge(u64::MAX, 0x8000), Some(0xffff_8000));
        // movsxd rdx, dword [rax]
        let op = ok(&[0x48, 0x63, 0x10]);
        assert_eq!(
            (op.size, op.extend, op.operand),
            (4, Extension::Sign, reg(2, 8))
        );
        assert_eq!(op.read_merge(0, 0x8000_0000), Some(0xffff_ffff_8000_0000));
        // mov eax, [abs 0xfee00030] (A1 moffs32, 32-bit mode)
        let op = decode_mmio(&[0xa1, 0x30, 0x00, 0xe0, 0xfe], Mode::Bits32).unwrap();
        assert_eq!(
            (op.len, op.size, op.dir, op.operand),
            (5, 4, Direction::Read, reg(0, 4))
        );
    }

    #[test]
    fn modes_change_the_default_size() {
        // 89 07: mov [bx], ax in 16-bit mode, mov [edi], eax in 32-bit mode
        assert_eq!(decode_mmio(&[0x89, 0x07], Mode::Bits16).unwrap().size, 2);
        assert_eq!(decode_mmio(&[0x89, 0x07], Mode::Bits32).unwrap().size, 4);
        // 48 89 07 in 32-bit mode is `dec eax` then a separate mov: refused
        assert_eq!(
            decode_mmio(&[0x48, 0x89, 0x07], Mode::Bits32),
            Err(MmioError::Unsupported)
        );
    }

    #[test]
    fn refused_forms() {
        let cases: &[(&[u8], MmioError, &str)] = &[
            (&[0xf3, 0xab], MmioError::Unsupported, "rep stosd"),
            (&[0xab], MmioError::Unsupported, "stosd"),
            (&[0xa5], MmioError::Unsupported, "movsd"),
            (&[0x01, 0x07], MmioError::Unsupported, "add [rdi], eax"),
            (&[0x87, 0x07], MmioError::Unsupported, "xchg [rdi], eax"),
            (
                &[0x0f, 0xb1, 0x0f],
                MmioError::Unsupported,
                "cmpxchg [rdi], ecx",
            ),
            (
                &[0xf0, 0x09, 0x07],
                MmioError::Unsupported,
                "lock or [rdi], eax",
            ),
            (
                &[0x66, 0x0f, 0x6f, 0x07],
                MmioError::Unsupported,
                "movdqa xmm0, [rdi]",
            ),
            (
                &[0xc5, 0xfd, 0x6f, 0x07],
                MmioError::Unsupported,
                "vmovdqa ymm0, [rdi]",
            ),
            (&[0x89, 0xc7], MmioError::NoMemoryOperand, "mov edi, eax"),
            (&[0x8b, 0xc7], MmioError::NoMemoryOperand, "mov eax, edi"),
            (
                &[0xc7, 0xc0, 1, 0, 0, 0],
                MmioError::NoMemoryOperand,
                "mov eax, 1",
            ),
            (
                &[0xf0, 0x89, 0x07],
                MmioError::Invalid,
                "lock mov [rdi], eax",
            ),
            (&[0xf3, 0x89, 0x07], MmioError::Prefix, "rep mov [rdi], eax"),
            (&[0x8c, 0x07], MmioError::Unsupported, "mov [rdi], es"),
            (&[0x89], MmioError::Truncated, "mov with no ModRM"),
            (&[0xc7, 0x00, 0x78], MmioError::Truncated, "imm32 cut short"),
            (&[], MmioError::Truncated, "nothing fetched"),
            (&[0x0f, 0x0b], MmioError::Unsupported, "ud2"),
            (
                &[0x06, 0x90, 0x90, 0x90],
                MmioError::Invalid,
                "push es (invalid in 64-bit mode)",
            ),
        ];
        for (bytes, err, what) in cases {
            assert_eq!(decode_mmio(bytes, Mode::Bits64), Err(*err), "{what}");
        }
        // 16 bytes of prefixes: longer than the 15-byte limit
        let long = [0x66u8; 16];
        assert!(decode_mmio(&long, Mode::Bits64).is_err());
    }

    #[test]
    fn trailing_bytes_do_not_count() {
        // mov [rdi], eax followed by the next instruction's bytes
        let op = ok(&[0x89, 0x07, 0x0f, 0x0b, 0xcc, 0xcc]);
        assert_eq!(op.len, 2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        /// Hostile bytes: never a panic, and an accepted decode is
        /// consistent (fits the bytes, sane size, register width).
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20), m in 0u8..3) {
            let mode = [Mode::Bits16, Mode::Bits32, Mode::Bits64][usize::from(m)];
            if let Ok(op) = decode_mmio(&bytes, mode) {
                prop_assert!(usize::from(op.len) <= bytes.len() && op.len <= 15);
                prop_assert!(matches!(op.size, 1 | 2 | 4 | 8));
                if let Operand::Reg(r) = op.operand {
                    prop_assert!(r.index < 16 && matches!(r.width, 1 | 2 | 4 | 8));
                    if op.dir == Direction::Write {
                        prop_assert_eq!(r.width, op.size);
                    } else {
                        prop_assert!(r.width >= op.size);
                    }
                }
                let _ = op.read_merge(u64::MAX, u64::MAX);
            }
        }
    }
}
