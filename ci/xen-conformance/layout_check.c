/*
 * Layout conformance: every number in doppel_layout.h comes from the Rust
 * crate hv/abi (size_of / offset_of! via its FIELDS tables); every check
 * below compares it with Xen's public headers or with the C declarations in
 * doppel_msgs.h. A mismatch is a compile error.
 */
#define __XEN_TOOLS__ 1
#include <stddef.h>
#include <stdio.h>

#include "doppel_msgs.h"
#include <xen/errno.h>
#include <xen/hvm/save.h>
#include <xen/domctl.h>
#include <xen/arch-x86/hvm/start_info.h>
#include <xen/hvm/ioreq.h>
#include <stdint.h>
#include <string.h>

#include "doppel_layout.h"

#define FIELD_OK(type, name, off, size)                                        \
    _Static_assert(offsetof(type, name) == (off), #type "." #name " offset");  \
    _Static_assert(sizeof(((type *)0)->name) == (size), #type "." #name " size");

/* Xen's save records. */
#define CPU(name, off, size) FIELD_OK(struct hvm_hw_cpu, name, off, size)
DOPPEL_HVM_HW_CPU_FIELDS(CPU)
_Static_assert(sizeof(struct hvm_hw_cpu) == DOPPEL_HVM_HW_CPU_SIZE, "hvm_hw_cpu size");
_Static_assert(sizeof(HVM_SAVE_TYPE(CPU)) == DOPPEL_HVM_HW_CPU_SIZE, "HVM_SAVE_TYPE(CPU)");

#define HDR(name, off, size) FIELD_OK(struct hvm_save_header, name, off, size)
DOPPEL_HVM_SAVE_HEADER_FIELDS(HDR)
_Static_assert(sizeof(struct hvm_save_header) == DOPPEL_HVM_SAVE_HEADER_SIZE, "hvm_save_header size");

#define DESC(name, off, size) FIELD_OK(struct hvm_save_descriptor, name, off, size)
DOPPEL_HVM_SAVE_DESCRIPTOR_FIELDS(DESC)
_Static_assert(sizeof(struct hvm_save_descriptor) == DOPPEL_HVM_SAVE_DESCRIPTOR_SIZE, "descriptor size");

#define CODE(name, value) _Static_assert(HVM_SAVE_CODE(name) == (value), "typecode " #name);
DOPPEL_HVM_CODES(CODE)
_Static_assert(CPU_XSAVE_CODE == DOPPEL_HVM_CODE_CPU_XSAVE, "CPU_XSAVE typecode");
_Static_assert(CPU_MSR_CODE == DOPPEL_HVM_CODE_CPU_MSR, "CPU_MSR typecode");
_Static_assert(HVM_FILE_MAGIC == DOPPEL_HVM_FILE_MAGIC, "HVM_FILE_MAGIC");
_Static_assert(HVM_FILE_VERSION == DOPPEL_HVM_FILE_VERSION, "HVM_FILE_VERSION");
_Static_assert(XEN_X86_FPU_INITIALISED == DOPPEL_XEN_X86_FPU_INITIALISED, "FPU_INITIALISED");

/* The platform devices' records. */
#define LAPIC(name, off, size) FIELD_OK(struct hvm_hw_lapic, name, off, size)
DOPPEL_HVM_HW_LAPIC_FIELDS(LAPIC)
_Static_assert(sizeof(struct hvm_hw_lapic) == DOPPEL_HVM_HW_LAPIC_SIZE, "hvm_hw_lapic size");
_Static_assert(sizeof(HVM_SAVE_TYPE(LAPIC)) == DOPPEL_HVM_HW_LAPIC_SIZE, "HVM_SAVE_TYPE(LAPIC)");
#define LREGS(name, off, size) FIELD_OK(struct hvm_hw_lapic_regs, name, off, size)
DOPPEL_HVM_HW_LAPIC_REGS_FIELDS(LREGS)
_Static_assert(sizeof(struct hvm_hw_lapic_regs) == DOPPEL_HVM_HW_LAPIC_REGS_SIZE, "hvm_hw_lapic_regs size");
_Static_assert(sizeof(HVM_SAVE_TYPE(LAPIC_REGS)) == DOPPEL_HVM_HW_LAPIC_REGS_SIZE, "HVM_SAVE_TYPE(LAPIC_REGS)");
#define VIOAPIC(name, off, size) FIELD_OK(struct hvm_hw_vioapic, name, off, size)
DOPPEL_HVM_HW_VIOAPIC_FIELDS(VIOAPIC)
_Static_assert(sizeof(struct hvm_hw_vioapic) == DOPPEL_HVM_HW_VIOAPIC_SIZE, "hvm_hw_vioapic size");
_Static_assert(sizeof(HVM_SAVE_TYPE(IOAPIC)) == DOPPEL_HVM_HW_VIOAPIC_SIZE, "HVM_SAVE_TYPE(IOAPIC)");
_Static_assert(sizeof(union vioapic_redir_entry) == 8, "vioapic_redir_entry size");
#define PIT(name, off, size) FIELD_OK(struct hvm_hw_pit, name, off, size)
DOPPEL_HVM_HW_PIT_FIELDS(PIT)
_Static_assert(sizeof(struct hvm_hw_pit) == DOPPEL_HVM_HW_PIT_SIZE, "hvm_hw_pit size");
_Static_assert(sizeof(HVM_SAVE_TYPE(PIT)) == DOPPEL_HVM_HW_PIT_SIZE, "HVM_SAVE_TYPE(PIT)");
#define PITCH(name, off, size) FIELD_OK(struct hvm_hw_pit_channel, name, off, size)
DOPPEL_HVM_HW_PIT_CHANNEL_FIELDS(PITCH)
_Static_assert(sizeof(struct hvm_hw_pit_channel) == DOPPEL_HVM_HW_PIT_CHANNEL_SIZE, "hvm_hw_pit_channel size");
_Static_assert(sizeof(((struct hvm_hw_pit *)0)->channels) / sizeof(struct hvm_hw_pit_channel) == DOPPEL_PIT_CHANNELS,
               "hvm_hw_pit channels");
#define RTC(name, off, size) FIELD_OK(struct hvm_hw_rtc, name, off, size)
DOPPEL_HVM_HW_RTC_FIELDS(RTC)
_Static_assert(sizeof(struct hvm_hw_rtc) == DOPPEL_HVM_HW_RTC_SIZE, "hvm_hw_rtc size");
_Static_assert(sizeof(HVM_SAVE_TYPE(RTC)) == DOPPEL_HVM_HW_RTC_SIZE, "HVM_SAVE_TYPE(RTC)");
#define MTRR(name, off, size) FIELD_OK(struct hvm_hw_mtrr, name, off, size)
DOPPEL_HVM_HW_MTRR_FIELDS(MTRR)
_Static_assert(sizeof(struct hvm_hw_mtrr) == DOPPEL_HVM_HW_MTRR_SIZE, "hvm_hw_mtrr size");
_Static_assert(sizeof(HVM_SAVE_TYPE(MTRR)) == DOPPEL_HVM_HW_MTRR_SIZE, "HVM_SAVE_TYPE(MTRR)");
#define TSCADJ(name, off, size) FIELD_OK(struct hvm_tsc_adjust, name, off, size)
DOPPEL_HVM_HW_TSC_ADJUST_FIELDS(TSCADJ)
_Static_assert(sizeof(struct hvm_tsc_adjust) == DOPPEL_HVM_HW_TSC_ADJUST_SIZE, "hvm_tsc_adjust size");
_Static_assert(sizeof(HVM_SAVE_TYPE(TSC_ADJUST)) == DOPPEL_HVM_HW_TSC_ADJUST_SIZE, "HVM_SAVE_TYPE(TSC_ADJUST)");
#define BOUND(name, value) _Static_assert(name == (value), #name);
DOPPEL_HVM_BOUNDS(BOUND)

/* PVH boot information. */
#define SINFO(name, off, size) FIELD_OK(struct hvm_start_info, name, off, size)
DOPPEL_START_INFO_FIELDS(SINFO)
_Static_assert(sizeof(struct hvm_start_info) == DOPPEL_START_INFO_SIZE, "hvm_start_info size");
#define MODL(name, off, size) FIELD_OK(struct hvm_modlist_entry, name, off, size)
DOPPEL_MODLIST_ENTRY_FIELDS(MODL)
_Static_assert(sizeof(struct hvm_modlist_entry) == DOPPEL_MODLIST_ENTRY_SIZE, "hvm_modlist_entry size");
#define MMAP(name, off, size) FIELD_OK(struct hvm_memmap_table_entry, name, off, size)
DOPPEL_MEMMAP_ENTRY_FIELDS(MMAP)
_Static_assert(sizeof(struct hvm_memmap_table_entry) == DOPPEL_MEMMAP_ENTRY_SIZE, "hvm_memmap_table_entry size");
_Static_assert(XEN_HVM_START_MAGIC_VALUE == DOPPEL_HVM_START_MAGIC, "XEN_HVM_START_MAGIC_VALUE");
#define MTYPE(name, value) _Static_assert(XEN_HVM_MEMMAP_TYPE_##name == (value), "memmap type " #name);
DOPPEL_MEMMAP_TYPES(MTYPE)

/* The device model's ioreq slot and buffered page. */
#define IOREQ(name, off, size) FIELD_OK(struct ioreq, name, off, size)
DOPPEL_IOREQ_FIELDS(IOREQ)
_Static_assert(sizeof(struct ioreq) == DOPPEL_IOREQ_SIZE, "ioreq size");
_Static_assert(sizeof(struct shared_iopage) == DOPPEL_IOREQ_SIZE, "shared_iopage: one vCPU's slot");
_Static_assert(sizeof(buf_ioreq_t) == DOPPEL_BUF_SLOT, "buf_ioreq size");
_Static_assert(offsetof(struct buffered_iopage, buf_ioreq) == DOPPEL_BUF_HEADER, "buf_ioreq slots start");
_Static_assert(sizeof(struct buffered_iopage) == DOPPEL_BUF_HEADER + IOREQ_BUFFER_SLOT_NUM * DOPPEL_BUF_SLOT,
               "buffered_iopage size");
#define IOCONST(name, value) _Static_assert(name == (value), #name);
DOPPEL_IOREQ_CONSTS(IOCONST)

/* Bit-fields have no offsetof: compare their bytes at run time. */
static int ioreq_bits_ok(void)
{
    struct ioreq r;
    buf_ioreq_t b;
    uint8_t flags;
    uint64_t word;
    memset(&r, 0, sizeof r);
    r.state = STATE_IORESP_READY;
    r.dir = IOREQ_READ;
    memcpy(&flags, (const uint8_t *)&r + 30, 1);
    memset(&b, 0, sizeof b);
    b.type = IOREQ_TYPE_COPY;
    b.dir = IOREQ_WRITE;
    b.size = 2;
    b.addr = 0x12345;
    b.data = 0xdeadbeef;
    memcpy(&word, &b, 8);
    if (flags != DOPPEL_FLAGS_RESP_READ) {
        printf("struct ioreq flags byte: Xen 0x%02x, hv/abi 0x%02x\n", flags, DOPPEL_FLAGS_RESP_READ);
        return 0;
    }
    if (word != DOPPEL_BUF_WRITE) {
        printf("buf_ioreq: Xen 0x%016llx, hv/abi 0x%016llx\n", (unsigned long long)word,
               (unsigned long long)DOPPEL_BUF_WRITE);
        return 0;
    }
    return 1;
}

/* Log-dirty operations. */
#define SHADOW(name, value) _Static_assert(XEN_DOMCTL_SHADOW_OP_##name == (value), "shadow op " #name);
DOPPEL_SHADOW_OPS(SHADOW)

/* Errno values on the wire. */
#define ERRNO(name, value) _Static_assert(XEN_##name == (value), "errno " #name);
DOPPEL_ERRNOS(ERRNO)

/* The shared ring header, as DEFINE_RING_TYPES lays it out. */
#define SRING(name, off, size) FIELD_OK(struct doppel_cmd_sring, name, off, size)
DOPPEL_SRING_FIELDS(SRING)
_Static_assert(offsetof(struct doppel_cmd_sring, ring) == DOPPEL_SRING_HEADER_SIZE, "slots start");
_Static_assert(offsetof(struct doppel_evt_sring, ring) == DOPPEL_SRING_HEADER_SIZE, "slots start");

/* Our entries, and the slot (C union) size of each ring. */
#define CMD(name, off, size) FIELD_OK(struct doppel_command, name, off, size)
DOPPEL_COMMAND_FIELDS(CMD)
_Static_assert(sizeof(struct doppel_command) == DOPPEL_COMMAND_SIZE, "command size");
#define RSP(name, off, size) FIELD_OK(struct doppel_response, name, off, size)
DOPPEL_RESPONSE_FIELDS(RSP)
_Static_assert(sizeof(struct doppel_response) == DOPPEL_RESPONSE_SIZE, "response size");
#define EVT(name, off, size) FIELD_OK(struct doppel_event, name, off, size)
DOPPEL_EVENT_FIELDS(EVT)
_Static_assert(sizeof(struct doppel_event) == DOPPEL_EVENT_SIZE, "event size");
#define ACK(name, off, size) FIELD_OK(struct doppel_event_ack, name, off, size)
DOPPEL_EVENT_ACK_FIELDS(ACK)
_Static_assert(sizeof(struct doppel_event_ack) == DOPPEL_EVENT_ACK_SIZE, "ack size");
_Static_assert(sizeof(union doppel_cmd_sring_entry) == DOPPEL_CMD_SLOT, "command slot");
_Static_assert(sizeof(union doppel_evt_sring_entry) == DOPPEL_EVT_SLOT, "event slot");

/* Slot counts: Xen's __CONST_RING_SIZE against hv/abi's ring_entries(). */
#define ENTRIES(ring, bytes, n) _Static_assert(__CONST_RING_SIZE(ring, bytes) == (n), #ring " entries in " #bytes);
DOPPEL_RING_ENTRIES(ENTRIES)

#define COUNT(...) +1
int main(void)
{
    int fields = 0 DOPPEL_HVM_HW_CPU_FIELDS(COUNT) DOPPEL_HVM_SAVE_HEADER_FIELDS(COUNT)
        DOPPEL_HVM_SAVE_DESCRIPTOR_FIELDS(COUNT) DOPPEL_SRING_FIELDS(COUNT)
        DOPPEL_COMMAND_FIELDS(COUNT) DOPPEL_RESPONSE_FIELDS(COUNT)
        DOPPEL_EVENT_FIELDS(COUNT) DOPPEL_EVENT_ACK_FIELDS(COUNT)
        DOPPEL_START_INFO_FIELDS(COUNT) DOPPEL_MODLIST_ENTRY_FIELDS(COUNT)
        DOPPEL_MEMMAP_ENTRY_FIELDS(COUNT) DOPPEL_HVM_HW_LAPIC_FIELDS(COUNT)
        DOPPEL_HVM_HW_LAPIC_REGS_FIELDS(COUNT) DOPPEL_HVM_HW_VIOAPIC_FIELDS(COUNT)
        DOPPEL_HVM_HW_PIT_FIELDS(COUNT) DOPPEL_HVM_HW_PIT_CHANNEL_FIELDS(COUNT)
        DOPPEL_HVM_HW_RTC_FIELDS(COUNT) DOPPEL_HVM_HW_MTRR_FIELDS(COUNT)
        DOPPEL_HVM_HW_TSC_ADJUST_FIELDS(COUNT) DOPPEL_IOREQ_FIELDS(COUNT);
    int consts = 0 DOPPEL_HVM_CODES(COUNT) DOPPEL_SHADOW_OPS(COUNT) DOPPEL_ERRNOS(COUNT)
        DOPPEL_RING_ENTRIES(COUNT) DOPPEL_MEMMAP_TYPES(COUNT) DOPPEL_HVM_BOUNDS(COUNT)
        DOPPEL_IOREQ_CONSTS(COUNT);
    if (!ioreq_bits_ok())
        return 1;
    printf("layout ok: %d fields and %d constants match Xen's public headers, ioreq bit-fields too (interface 0x%08x)\n",
           fields, consts + 7, __XEN_LATEST_INTERFACE_VERSION__);
    return 0;
}
