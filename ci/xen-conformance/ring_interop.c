/*
 * Live ring interop: this program drives one side of a Doppel ring with
 * Xen's own io/ring.h macros over a shared file, while the Rust side
 * (hv/abi via `cargo xtask test`) drives the other side.
 *
 *   ring_interop FILE cmd-front N START   C = tool: N commands out, N responses in
 *   ring_interop FILE evt-back  N START   C = tool: N events in, N acks out
 *   ring_interop notify-table  N SEED     print Xen's decisions for random states
 *
 * FILE layout: page 0 holds the doorbells (u32 to_c @0, to_rust @4,
 * failed @8), the ring region starts at 4096 and is RING_BYTES long.
 * A side that finds no work after the final check sleeps until its doorbell
 * changes; it is only rung when the peer's notify decision says so, so a
 * wrong decision on either side shows up as a timeout.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "doppel_msgs.h"

#define RING_OFFSET 4096
#define BELL_TO_C 0
#define BELL_TO_RUST 1
#define FAILED 2

static volatile uint32_t *bells;
static uint64_t rng_state = 88172645463325252ull;

static uint64_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void delay(void)
{
    uint64_t r = rng() % 64;
    if (r == 0)
        usleep(1);
    else if (r < 6)
        for (volatile int i = 0; i < (int)(rng() % 200); i++)
            ;
}

static void fail(const char *what, uint64_t a, uint64_t b)
{
    fprintf(stderr, "ring_interop: %s (%" PRIu64 ", %" PRIu64 ")\n", what, a, b);
    __atomic_store_n(&bells[FAILED], 1, __ATOMIC_SEQ_CST);
    exit(2);
}

static uint32_t seen(void) { return __atomic_load_n(&bells[BELL_TO_C], __ATOMIC_SEQ_CST); }
static void ring_rust(void) { __atomic_fetch_add(&bells[BELL_TO_RUST], 1, __ATOMIC_SEQ_CST); }

static unsigned long waits;
static void wait_bell(uint32_t since)
{
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    waits++;
    while (__atomic_load_n(&bells[BELL_TO_C], __ATOMIC_SEQ_CST) == since) {
        if (__atomic_load_n(&bells[FAILED], __ATOMIC_SEQ_CST))
            fail("peer failed", 0, 0);
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec > 20)
            fail("lost wakeup: no notification for 20 s", since, 0);
        sched_yield();
    }
}

static void *map(const char *path, size_t *len)
{
    int fd = open(path, O_RDWR);
    if (fd < 0) {
        perror(path);
        exit(1);
    }
    off_t size = lseek(fd, 0, SEEK_END);
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    close(fd);
    *len = size;
    return p;
}

/* C is the tool: sends COMMIT_EPOCH commands (every 7th one with an unknown
 * opcode, which the hypervisor must answer with -ENOSYS). */
static int cmd_front(char *base, size_t len, uint32_t n, RING_IDX start)
{
    struct doppel_cmd_sring *s = (void *)(base + RING_OFFSET);
    struct doppel_cmd_front_ring fr;
    FRONT_RING_ATTACH(&fr, s, start, len - RING_OFFSET);
    uint32_t sent = 0, acked = 0;
    unsigned long notifies = 0;
    while (acked < n) {
        uint32_t bell = seen();
        int progressed = 0;
        while (sent < n && !RING_FULL(&fr) && rng() % 8) {
            struct doppel_command *c = RING_GET_REQUEST(&fr, fr.req_prod_pvt);
            memset(c, 0, sizeof(*c));
            c->op = sent % 7 == 6 ? 99 : DOPPEL_OP_COMMIT_EPOCH;
            c->id = sent;
            c->args[0] = sent % 7 == 6 ? 0 : (uint64_t)sent * 3 + 1;
            fr.req_prod_pvt++;
            sent++;
            progressed = 1;
        }
        int notify;
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, notify);
        if (notify) {
            notifies++;
            ring_rust();
        }
        RING_IDX rp = fr.sring->rsp_prod;
        xen_rmb();
        if (RING_RESPONSE_PROD_OVERFLOW(&fr, rp))
            fail("response producer overflow", rp, fr.rsp_cons);
        while (fr.rsp_cons != rp) {
            struct doppel_response r;
            RING_COPY_RESPONSE(&fr, fr.rsp_cons, &r);
            int bad = 0;
            int32_t want = acked % 7 == 6 ? -ENOSYS : 0;
            uint32_t want_op = acked % 7 == 6 ? 99 : DOPPEL_OP_COMMIT_EPOCH;
            bad |= r.id != acked || r.op != want_op || r.status != want || r.reserved0;
            for (int i = 0; i < 3; i++)
                bad |= r.vals[i] != 0 || r.reserved[i] != 0;
            if (bad)
                fail("wrong response", r.id, acked);
            fr.rsp_cons++;
            acked++;
            progressed = 1;
        }
        if (!progressed && (sent == n || RING_FULL(&fr))) {
            int more;
            RING_FINAL_CHECK_FOR_RESPONSES(&fr, more);
            if (!more)
                wait_bell(bell);
        }
        delay();
    }
    printf("cmd-front: %u commands sent, %u responses checked, %lu notifies, %lu waits\n", sent,
           acked, notifies, waits);
    return 0;
}

/* C is the tool: consumes events, checks them, acks each one. */
static int evt_back(char *base, size_t len, uint32_t n, RING_IDX start)
{
    struct doppel_evt_sring *s = (void *)(base + RING_OFFSET);
    struct doppel_evt_back_ring br;
    BACK_RING_ATTACH(&br, s, start, len - RING_OFFSET);
    uint32_t got = 0;
    unsigned long notifies = 0;
    while (got < n) {
        uint32_t bell = seen();
        RING_IDX rp = br.sring->req_prod;
        xen_rmb();
        if (RING_REQUEST_PROD_OVERFLOW(&br, rp))
            fail("request producer overflow", rp, br.req_cons);
        int progressed = 0;
        while (br.req_cons != rp && !RING_REQUEST_CONS_OVERFLOW(&br, br.req_cons)) {
            struct doppel_event e;
            RING_COPY_REQUEST(&br, br.req_cons, &e);
            br.req_cons++;
            uint64_t i = got;
            int bad = e.seq != got || e.epoch != i;
            if (i % 3 == 2) {
                bad |= e.kind != DOPPEL_KIND_OUTPUT_AVAILABLE || e.value != i * 100;
                bad |= e.pfn_list.len || e.pages.len || e.vcpu.len;
            } else {
                uint64_t d = i % 50;
                bad |= e.kind != DOPPEL_KIND_CHECKPOINT_READY || e.value != d;
                bad |= e.pfn_list.offset != 8192 || e.pfn_list.len != d * 8;
                bad |= e.pages.offset != 65536 || e.pages.len != d * 4096;
                bad |= e.vcpu.offset != 16384 || e.vcpu.len != 1032;
            }
            bad |= e.status != 0 || e.op != 0;
            for (int k = 0; k < 6; k++)
                bad |= e.reserved[k] != 0;
            if (bad)
                fail("wrong event", e.seq, got);
            struct doppel_event_ack *a = RING_GET_RESPONSE(&br, br.rsp_prod_pvt);
            memset(a, 0, sizeof(*a));
            a->kind = e.kind;
            a->seq = e.seq;
            a->epoch = e.epoch;
            br.rsp_prod_pvt++;
            got++;
            progressed = 1;
            if (rng() % 4 == 0)
                break;
        }
        int notify;
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&br, notify);
        if (notify) {
            notifies++;
            ring_rust();
        }
        if (!progressed) {
            int more;
            RING_FINAL_CHECK_FOR_REQUESTS(&br, more);
            if (!more)
                wait_bell(bell);
        }
        delay();
    }
    printf("evt-back: %u events checked and acked, %lu notifies, %lu waits\n", got, notifies,
           waits);
    return 0;
}

/* Xen's decisions for random ring states, one per line:
 *   push-req OLD NEW EVENT NOTIFY
 *   push-rsp OLD NEW EVENT NOTIFY
 *   final-req CONS PROD WORK EVENT_AFTER
 *   final-rsp CONS PROD WORK EVENT_AFTER
 * Indices are drawn near 0 and near the 2^32 wrap. */
static int notify_table(uint32_t n)
{
    static union {
        struct doppel_cmd_sring s;
        char page[4096];
    } u;
    struct doppel_cmd_sring *s = &u.s;
    unsigned entries = __RING_SIZE(s, sizeof(u));
    for (uint32_t i = 0; i < n; i++) {
        RING_IDX old = (RING_IDX)(rng() % 4 == 0 ? rng() : (rng() % 64) - 32);
        RING_IDX new = old + (RING_IDX)(rng() % (entries + 1));
        RING_IDX event = old + (RING_IDX)(rng() % (2 * entries + 4)) - entries - 2;
        int notify, work;
        SHARED_RING_INIT(s);
        struct doppel_cmd_front_ring fr;
        FRONT_RING_ATTACH(&fr, s, old, sizeof(u));
        s->req_prod = old;
        fr.req_prod_pvt = new;
        s->req_event = event;
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, notify);
        printf("push-req %u %u %u %d\n", old, new, event, notify);

        struct doppel_cmd_back_ring br;
        BACK_RING_ATTACH(&br, s, old, sizeof(u));
        s->rsp_prod = old;
        br.rsp_prod_pvt = new;
        br.req_cons = new;
        s->rsp_event = event;
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&br, notify);
        printf("push-rsp %u %u %u %d\n", old, new, event, notify);

        RING_IDX pending = (RING_IDX)(rng() % 3);
        BACK_RING_ATTACH(&br, s, old, sizeof(u));
        s->req_prod = old + pending;
        s->req_event = event;
        RING_FINAL_CHECK_FOR_REQUESTS(&br, work);
        printf("final-req %u %u %d %u\n", old, old + pending, !!work, s->req_event);

        SHARED_RING_INIT(s);
        FRONT_RING_ATTACH(&fr, s, old, sizeof(u));
        fr.req_prod_pvt = old + 2;
        s->req_prod = old + 2;
        s->rsp_prod = old + pending;
        s->rsp_event = event;
        RING_FINAL_CHECK_FOR_RESPONSES(&fr, work);
        printf("final-rsp %u %u %d %u\n", old, old + pending, !!work, s->rsp_event);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "notify-table")) {
        rng_state ^= strtoull(argv[3], NULL, 0);
        return notify_table(strtoul(argv[2], NULL, 0));
    }
    if (argc != 5) {
        fprintf(stderr, "usage: %s FILE cmd-front|evt-back N START | notify-table N SEED\n",
                argv[0]);
        return 1;
    }
    size_t len;
    char *base = map(argv[1], &len);
    bells = (volatile uint32_t *)base;
    uint32_t n = strtoul(argv[3], NULL, 0);
    RING_IDX start = strtoul(argv[4], NULL, 0);
    if (!strcmp(argv[2], "cmd-front"))
        return cmd_front(base, len, n, start);
    if (!strcmp(argv[2], "evt-back"))
        return evt_back(base, len, n, start);
    fprintf(stderr, "unknown mode %s\n", argv[2]);
    return 1;
}
