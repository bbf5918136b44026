//! Field tables of the shared layouts, for conformance checks against C.

/// Name, offset and size of one field of a layout struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldInfo {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
}

/// Declare a `#[repr(C)]` zerocopy struct together with its `FIELDS` table
/// (every field's name, offset and size, in declaration order).
macro_rules! layout_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(
            zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable, zerocopy::KnownLayout,
        )]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $name {
            /// Every field, in declaration order.
            pub const FIELDS: &'static [$crate::layout::FieldInfo] = &[
                $( $crate::layout::FieldInfo {
                    name: stringify!($field),
                    offset: core::mem::offset_of!($name, $field),
                    size: core::mem::size_of::<$ty>(),
                }, )*
            ];
        }
    };
}
pub(crate) use layout_struct;

#[cfg(test)]
mod tests {
    use crate::{chan, control, hvm, ioreq, msg, pvh, ring};
    use core::mem::size_of;

    #[test]
    fn field_tables_tile_the_structs() {
        // Fields are contiguous, in order, and cover the whole struct: no
        // hidden padding and no field missing from a table.
        for (fields, size) in [
            (
                hvm::HvmSaveDescriptor::FIELDS,
                size_of::<hvm::HvmSaveDescriptor>(),
            ),
            (hvm::HvmSaveHeader::FIELDS, size_of::<hvm::HvmSaveHeader>()),
            (ioreq::Ioreq::FIELDS, size_of::<ioreq::Ioreq>()),
            (ioreq::DmDevice::FIELDS, size_of::<ioreq::DmDevice>()),
            (ioreq::DmHeader::FIELDS, size_of::<ioreq::DmHeader>()),
            (hvm::HvmHwCpu::FIELDS, size_of::<hvm::HvmHwCpu>()),
            (hvm::HvmHwLapic::FIELDS, size_of::<hvm::HvmHwLapic>()),
            (
                hvm::HvmHwLapicRegs::FIELDS,
                size_of::<hvm::HvmHwLapicRegs>(),
            ),
            (hvm::HvmHwVioapic::FIELDS, size_of::<hvm::HvmHwVioapic>()),
            (hvm::HvmHwRtc::FIELDS, size_of::<hvm::HvmHwRtc>()),
            (
                hvm::HvmHwPitChannel::FIELDS,
                size_of::<hvm::HvmHwPitChannel>(),
            ),
            (hvm::HvmHwPit::FIELDS, size_of::<hvm::HvmHwPit>()),
            (hvm::HvmHwMtrr::FIELDS, size_of::<hvm::HvmHwMtrr>()),
            (hvm::HvmTscAdjust::FIELDS, size_of::<hvm::HvmTscAdjust>()),
            (ring::SringHeader::FIELDS, size_of::<ring::SringHeader>()),
            (msg::CommandEntry::FIELDS, size_of::<msg::CommandEntry>()),
            (msg::ResponseEntry::FIELDS, size_of::<msg::ResponseEntry>()),
            (msg::EventEntry::FIELDS, size_of::<msg::EventEntry>()),
            (msg::EventAck::FIELDS, size_of::<msg::EventAck>()),
            (msg::Span::FIELDS, size_of::<msg::Span>()),
            (chan::RecordHeader::FIELDS, size_of::<chan::RecordHeader>()),
            (
                control::ControlHeader::FIELDS,
                size_of::<control::ControlHeader>(),
            ),
            (control::Region::FIELDS, size_of::<control::Region>()),
            (pvh::HvmStartInfo::FIELDS, size_of::<pvh::HvmStartInfo>()),
            (
                pvh::HvmModlistEntry::FIELDS,
                size_of::<pvh::HvmModlistEntry>(),
            ),
            (
                pvh::HvmMemmapTableEntry::FIELDS,
                size_of::<pvh::HvmMemmapTableEntry>(),
            ),
        ] {
            let mut at = 0;
            for f in fields {
                assert_eq!(f.offset, at, "{}", f.name);
                at += f.size;
            }
            assert_eq!(at, size);
        }
        assert_eq!(hvm::HvmHwCpu::FIELDS.len(), 81);
    }
}
