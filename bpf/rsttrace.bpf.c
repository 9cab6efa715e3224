// SPDX-License-Identifier: GPL-2.0
/*
 * rsttrace BPF programs, compiled by bcc at start.
 *
 * rsttrace/codegen.py prepends a prelude generated from the RUNNING kernel:
 *  - one packed struct per tracepoint, built from its tracefs format file (never from kernel
 *    headers: a 6.18 format names `enum sk_rst_reason`, which the 6.1 headers bcc compiles with
 *    do not define, and bcc's TRACEPOINT_PROBE copies such type names verbatim and fails);
 *  - HAVE_* / *_HAS_* macros saying which fields each tracepoint has on this kernel;
 *  - OFF_* byte offsets of struct sock / sk_buff / net fields read from BTF (-1 when unknown),
 *    so no layout ever comes from mismatched headers;
 *  - RSTTRACE_TCP_LISTEN, DROP_REASON_LISTEN_OVERFLOW: enum values read from BTF / tracefs.
 *
 * Everything here stores raw numbers; user space names them.
 */
#include "rsttrace.h"

#if defined(HAVE_KP_SEND_RESET) || defined(HAVE_KP_SYN_RECV) || defined(HAVE_KP_CONN_REQUEST)
#include <uapi/linux/ptrace.h> /* struct pt_regs, PT_REGS_PARM*: kprobes only */
#endif

/* Network to host order for 16 bits; BPF runs in the host's byte order. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define rst_ntohs(x) __builtin_bswap16(x)
#else
#define rst_ntohs(x) (x)
#endif

#ifdef RSTTRACE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RSTTRACE_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

/* BPF_TABLE rather than BPF_PERCPU_HASH, which bcc 0.18 (Debian 11) does not define */
BPF_TABLE("percpu_hash", struct rsttrace_counter_key, u64, counters, RSTTRACE_COUNTER_ENTRIES);
/* Where a count goes when "counters" is full, by kind: nothing counted is ever dropped. */
BPF_PERCPU_ARRAY(counters_spill, u64, RSTTRACE_KIND_MAX);
BPF_PERCPU_ARRAY(stats, u64, RSTTRACE_STAT_MAX);

#ifdef RSTTRACE_TOP
/*
 * rsttrace top: every event's tuple counted here instead of crossing to user space (admit()
 * admits all, emit() counts). A sized per-CPU hash, never deleted from while top runs, so a
 * row's count is exact since start; a key that finds it full is counted in "top_spill" by kind.
 * The "counters" above are untouched by this: they count first, exactly as without top.
 */
BPF_TABLE("percpu_hash", struct rsttrace_top_key, u64, top_counts, RSTTRACE_TOP_ENTRIES);
BPF_PERCPU_ARRAY(top_spill, u64, RSTTRACE_KIND_MAX);
static __always_inline void top_event(const struct rsttrace_event *e);
#endif

static __always_inline void stat_inc(u32 slot)
{
	u64 *v = stats.lookup(&slot);
	if (v)
		(*v)++;
}

static __always_inline void count(struct rsttrace_counter_key *key)
{
	u64 *v = counters.lookup(key);
	if (v) {
		/* Per-CPU slot, and tracing programs do not nest on a CPU: a plain add is exact. */
		(*v)++;
		return;
	}
	u64 one = 1;
	/* BPF_ANY: if another CPU inserted the key meanwhile, this writes only our CPU's slot,
	 * which was still 0, so the count stays exact. */
	if (counters.update(key, &one) != 0) {
		u32 kind = key->kind;
		u64 *s = counters_spill.lookup(&kind);
		if (s)
			(*s)++;
		stat_inc(RSTTRACE_STAT_COUNTER_FULL);
	}
}

#ifdef RSTTRACE_RATE_PER_CPU
/* The default event budget: at most RSTTRACE_RATE_PER_CPU events a second on each CPU (a fixed
 * one-second window: no division, no lock). What it holds back is counted, never lost from the
 * counters, which are updated before this is asked. */
struct rsttrace_window {
	u64 start;
	u64 count;
};
BPF_PERCPU_ARRAY(event_window, struct rsttrace_window, 1);
#endif

/*
 * Whether this event goes to user space: the filters, then the rate limit. Programs count first,
 * then ask this, and only then do the reads that only an event needs (addresses, owner, cookie,
 * cgroup): a storm that the budget holds back costs little more than counting it.
 */
static __always_inline int admit(struct rsttrace_event *e)
{
#ifdef RSTTRACE_TOP
	return 1; /* every event's details, for the top map (emit()); nothing crosses to user space */
#endif
#ifdef RSTTRACE_NO_EVENTS
	return 0;
#endif
#ifdef RSTTRACE_KIND_MASK
	if (!(RSTTRACE_KIND_MASK & (1 << e->kind)))
		return 0;
#endif
#ifdef RSTTRACE_NETNS_FILTER
	if (e->netns != RSTTRACE_NETNS_FILTER)
		return 0;
#endif
	e->ktime_ns = bpf_ktime_get_ns();
#ifdef RSTTRACE_RATE_PER_CPU
	{
		u32 zero = 0;
		struct rsttrace_window *w = event_window.lookup(&zero);
		if (w) {
			if (e->ktime_ns - w->start >= 1000000000ULL) {
				w->start = e->ktime_ns;
				w->count = 0;
			}
			if (w->count >= RSTTRACE_RATE_PER_CPU) {
				stat_inc(RSTTRACE_STAT_SUPPRESSED);
				return 0;
			}
			w->count++;
		}
	}
#endif
	return 1;
}

/* For an event that corrects one already delivered (a local abort's send after its receive):
 * past the budget and the kind filter, so user space always learns the correction. */
static __always_inline int admit_correction(struct rsttrace_event *e)
{
#ifdef RSTTRACE_TOP
	return 1;
#endif
#ifdef RSTTRACE_NO_EVENTS
	return 0;
#endif
	e->ktime_ns = bpf_ktime_get_ns();
	return 1;
}

static __always_inline void emit(void *ctx, struct rsttrace_event *e)
{
#ifdef RSTTRACE_TOP
	top_event(e);
	return;
#endif
#ifdef RSTTRACE_RINGBUF
	if (events.ringbuf_output(e, sizeof(*e), 0) != 0) {
		stat_inc(RSTTRACE_STAT_BUFFER_FULL);
		return;
	}
#else
	/* Counted here rather than from the perf lost callback: the kernel reports a loss to the
	 * reader only with the next record that fits (kernel/events/ring_buffer.c, rb->lost), so
	 * after a storm the last losses would stay unreported until traffic resumed. */
	if (events.perf_submit(ctx, e, sizeof(*e)) != 0) {
		stat_inc(RSTTRACE_STAT_BUFFER_FULL);
		return;
	}
#endif
	stat_inc(RSTTRACE_STAT_EVENTS);
}

/* --- reading kernel memory at BTF-derived offsets ------------------------------------- */

/*
 * A namespace's inode (what users see: `lsns`, /proc/PID/ns/net) and its generation: an id the
 * kernel never hands out twice (ns_common.ns_id, 6.18+, which sits right after inum so one read
 * takes both; else net->net_cookie, 5.12+; else 0). The kernel gives a freed namespace's inode
 * to the next one at once, so counters are keyed by both: a new pod never inherits a dead one's
 * counts, and user space retires every generation below the newest of an inode.
 */
static __always_inline void net_ident(const void *net, struct rsttrace_event *e)
{
#if OFF_NET_INUM >= 0
	if (!net)
		return;
#ifdef NETNS_GEN_NS_ID /* KernelFacts.netns_gen: ns_id within 8 bytes after inum */
	{
		u8 b[16];
		u64 id = 0;
		bpf_probe_read_kernel(b, sizeof(b), (const char *)net + OFF_NET_INUM);
		__builtin_memcpy(&e->netns, b, 4);
		__builtin_memcpy(&id, b + (OFF_NET_NS_ID - OFF_NET_INUM), 8);
		e->netns_gen = (u32)id;
	}
#else
	bpf_probe_read_kernel(&e->netns, sizeof(e->netns), (const char *)net + OFF_NET_INUM);
#ifdef NETNS_GEN_COOKIE
	{
		u64 cookie = 0;
		bpf_probe_read_kernel(&cookie, sizeof(cookie), (const char *)net + OFF_NET_COOKIE);
		e->netns_gen = (u32)cookie;
	}
#endif
#endif
#endif
}

static __always_inline void sk_netns(const void *sk, struct rsttrace_event *e)
{
	const void *net = 0;
#if OFF_SK_NET >= 0
	bpf_probe_read_kernel(&net, sizeof(net), (const char *)sk + OFF_SK_NET);
#endif
	net_ident(net, e);
}

static __always_inline void skb_dev_netns(const void *skb, struct rsttrace_event *e)
{
	const void *dev = 0, *net = 0;
#if OFF_SKB_DEV >= 0 && OFF_DEV_NET >= 0
	bpf_probe_read_kernel(&dev, sizeof(dev), (const char *)skb + OFF_SKB_DEV);
	if (dev)
		bpf_probe_read_kernel(&net, sizeof(net), (const char *)dev + OFF_DEV_NET);
#endif
	net_ident(net, e);
}

static __always_inline u8 sk_state(const void *sk)
{
	u8 state = 0;
#if OFF_SK_STATE >= 0
	bpf_probe_read_kernel(&state, sizeof(state), (const char *)sk + OFF_SK_STATE);
#endif
	return state;
}

static __always_inline u16 sk_family(const void *sk)
{
	u16 family = 0;
#if OFF_SK_FAMILY >= 0
	bpf_probe_read_kernel(&family, sizeof(family), (const char *)sk + OFF_SK_FAMILY);
#endif
	return family;
}

static __always_inline u64 sk_cookie(const void *sk)
{
	u64 cookie = 0;
#if OFF_SK_COOKIE >= 0
	bpf_probe_read_kernel(&cookie, sizeof(cookie), (const char *)sk + OFF_SK_COOKIE);
#endif
	return cookie;
}

static __always_inline u64 sk_cgroup_id(const void *sk)
{
	u64 id = 0;
#if OFF_SK_CGROUP >= 0 && OFF_CGROUP_KN >= 0 && OFF_KN_ID >= 0
	const void *cgrp = 0, *kn = 0;
	bpf_probe_read_kernel(&cgrp, sizeof(cgrp), (const char *)sk + OFF_SK_CGROUP);
	if (cgrp)
		bpf_probe_read_kernel(&kn, sizeof(kn), (const char *)cgrp + OFF_CGROUP_KN);
	if (kn)
		bpf_probe_read_kernel(&id, sizeof(id), (const char *)kn + OFF_KN_ID);
#endif
	return id;
}

/* Local address/port of a socket from struct sock_common (a listener's bound address). */
static __always_inline void sk_local(const void *sk, struct rsttrace_event *e)
{
	u16 num = 0;
#if OFF_SK_NUM >= 0
	bpf_probe_read_kernel(&num, sizeof(num), (const char *)sk + OFF_SK_NUM);
#endif
	e->lport = num; /* skc_num is host byte order */
	e->family = sk_family(sk);
	if (e->family == RSTTRACE_AF_INET) {
#if OFF_SK_RCV_SADDR >= 0
		bpf_probe_read_kernel(e->laddr, 4, (const char *)sk + OFF_SK_RCV_SADDR);
#endif
	} else {
#if OFF_SK_V6_RCV_SADDR >= 0
		bpf_probe_read_kernel(e->laddr, 16, (const char *)sk + OFF_SK_V6_RCV_SADDR);
#endif
	}
}

/*
 * The owner's pid/comm, only when a task holds the socket lock (sk_lock.owned): then we run in
 * that task's process context (close, shutdown, disconnect, tcp_abort, or release_sock's
 * backlog processing). In softirq the current task is a bystander, so nothing is reported.
 */
static __always_inline void owner(const void *sk, struct rsttrace_event *e)
{
#if OFF_SK_LOCK_OWNED >= 0
	int owned = 0;
	bpf_probe_read_kernel(&owned, sizeof(owned), (const char *)sk + OFF_SK_LOCK_OWNED);
	if (!owned)
		return;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->flags |= RSTTRACE_F_PROCESS;
#endif
}

/*
 * Addresses from the packet (an incoming skb): its source is the remote side. Used when the
 * kernel passes the listener socket (tcp_check_req resets, accept-queue overflows), whose own
 * addresses are the wildcard bind, not the peer.
 */
static __always_inline int skb_tuple(const void *skb, struct rsttrace_event *e)
{
#if OFF_SKB_HEAD >= 0 && OFF_SKB_NETWORK_HEADER >= 0 && OFF_SKB_TRANSPORT_HEADER >= 0
	const unsigned char *head = 0;
	u16 nh = 0, th = 0;
	u8 vihl = 0;
	u16 ports[2] = {};

	bpf_probe_read_kernel(&head, sizeof(head), (const char *)skb + OFF_SKB_HEAD);
	bpf_probe_read_kernel(&nh, sizeof(nh), (const char *)skb + OFF_SKB_NETWORK_HEADER);
	bpf_probe_read_kernel(&th, sizeof(th), (const char *)skb + OFF_SKB_TRANSPORT_HEADER);
	/* (u16)~0U means "not set" (skb_transport_header_was_set) */
	if (!head || nh == 0xffff || th == 0xffff)
		return -1;
	bpf_probe_read_kernel(&vihl, 1, head + nh);
	if ((vihl >> 4) == 4) {
		e->family = RSTTRACE_AF_INET;
		bpf_probe_read_kernel(e->raddr, 4, head + nh + 12);
		bpf_probe_read_kernel(e->laddr, 4, head + nh + 16);
	} else if ((vihl >> 4) == 6) {
		e->family = RSTTRACE_AF_INET6;
		bpf_probe_read_kernel(e->raddr, 16, head + nh + 8);
		bpf_probe_read_kernel(e->laddr, 16, head + nh + 24);
	} else {
		return -1;
	}
	bpf_probe_read_kernel(ports, sizeof(ports), head + th);
	e->rport = rst_ntohs(ports[0]);
	e->lport = rst_ntohs(ports[1]);
	return 0;
#else
	return -1;
#endif
}

/* TCP flags byte of the packet (offset 13 of the TCP header), 0 when unreadable. */
static __always_inline u8 skb_tcp_flags(const void *skb)
{
	u8 flags = 0;
#if OFF_SKB_HEAD >= 0 && OFF_SKB_TRANSPORT_HEADER >= 0
	const unsigned char *head = 0;
	u16 th = 0;
	bpf_probe_read_kernel(&head, sizeof(head), (const char *)skb + OFF_SKB_HEAD);
	bpf_probe_read_kernel(&th, sizeof(th), (const char *)skb + OFF_SKB_TRANSPORT_HEADER);
	if (head && th != 0xffff)
		bpf_probe_read_kernel(&flags, 1, head + th + 13);
#endif
	return flags;
}

/* For events about a listener: the packet names the peer (and the exact local address the
 * client used); the listener's port stays if the packet cannot be read. */
static __always_inline void peer_from_packet(const void *skb, struct rsttrace_event *e)
{
	u16 lport = e->lport;
	if (skb_tuple(skb, e) == 0)
		e->flags |= RSTTRACE_F_PEER_FROM_SKB;
	else
		e->lport = lport;
}

/* A sockaddr_in / sockaddr_in6 as the 6.10+ tracepoints store them (28 bytes). */
static __always_inline void from_sockaddr(const u8 *sa, u8 *addr, u16 *port, u16 *family)
{
	u16 fam = 0, p = 0;
	__builtin_memcpy(&fam, sa, 2);
	__builtin_memcpy(&p, sa + 2, 2);
	*family = fam;
	*port = rst_ntohs(p);
	if (fam == RSTTRACE_AF_INET)
		__builtin_memcpy(addr, sa + 4, 4);
	else if (fam == RSTTRACE_AF_INET6)
		__builtin_memcpy(addr, sa + 8, 16);
}

static __always_inline void counter_key(const struct rsttrace_event *e, struct rsttrace_counter_key *key)
{
	key->netns = e->netns;
	key->netns_gen = e->netns_gen;
	key->reason = e->reason;
	key->kind = e->kind;
	key->state = e->state;
	key->family = (u8)e->family;
	if (e->kind == RSTTRACE_KIND_LISTEN_OVERFLOW_ACK || e->kind == RSTTRACE_KIND_LISTEN_OVERFLOW_SYN)
		key->port = e->lport;
	key->flags = e->flags & (RSTTRACE_F_REQUEST_SOCK | RSTTRACE_F_SYNCOOKIE);
	if (e->kind == RSTTRACE_KIND_SENT && e->reason == RSTTRACE_REASON_NONE)
		key->flags |= e->flags & (RSTTRACE_F_ACTIVE | RSTTRACE_F_PROCESS | RSTTRACE_F_LOCAL_ABORT);
}

static __always_inline void count_event(struct rsttrace_event *e)
{
	struct rsttrace_counter_key key = {};
	counter_key(e, &key);
	count(&key);
}

/*
 * tcp_reset() runs tcp:tcp_receive_reset first thing, whoever decided the reset. One caller is
 * not a RST at all: data for a socket in FIN_WAIT1/FIN_WAIT2 that was shut down for reading
 * (net/ipv4/tcp_input.c, tcp_rcv_state_process: TCPAbortOnData, tcp_reset(), then the caller
 * sends its own RST: tcp_v4_do_rcv's `reset:` label, reason TCP_ABORT_ON_DATA). The socket alone
 * cannot tell that from a real RST arriving after shutdown(), so a receive in those states is
 * remembered here (per CPU: both hooks run in the same call chain, softirq or release_sock)
 * and the send program that follows for the same socket takes the count back.
 */
struct rsttrace_rx_pending {
	u64 sk;
	u64 ktime_ns;
	struct rsttrace_counter_key key;
	u32 admitted; /* its event went to user space: the correcting send event must too */
#ifdef RSTTRACE_TOP
	struct rsttrace_top_key top; /* where top_event() counted it */
	u32 top_in_row;              /* 1: in top_counts, 0: in top_spill, 2: not counted (--netns) */
#endif
};
BPF_PERCPU_ARRAY(rx_pending, struct rsttrace_rx_pending, 1);

static __always_inline void rx_remember(const void *sk, const struct rsttrace_event *e)
{
	u32 zero = 0;
	struct rsttrace_rx_pending *p;

	if (e->state != RSTTRACE_TCP_FIN_WAIT1 && e->state != RSTTRACE_TCP_FIN_WAIT2)
		return;
	p = rx_pending.lookup(&zero);
	if (!p)
		return;
	p->sk = (u64)sk;
	p->ktime_ns = bpf_ktime_get_ns();
	__builtin_memset(&p->key, 0, sizeof(p->key));
	counter_key(e, &p->key);
	p->admitted = 0;
}

static __always_inline void rx_admitted(const void *sk)
{
	u32 zero = 0;
	struct rsttrace_rx_pending *p = rx_pending.lookup(&zero);
	if (p && p->sk == (u64)sk)
		p->admitted = 1;
}

/* In a send program, for a passive reset of socket sk: 1 if tcp_reset() ran for sk just before
 * on this CPU (a local abort), with that receive's count taken back; 2 if its event went out. */
static __always_inline int rx_take_back(const void *sk)
{
	u32 zero = 0;
	struct rsttrace_rx_pending *p = rx_pending.lookup(&zero);
	u64 *v;
	int ret;

	if (!p || !sk || p->sk != (u64)sk)
		return 0;
	p->sk = 0;
	/* Same call chain: microseconds apart. An old entry is a recycled pointer, not ours. */
	if (bpf_ktime_get_ns() - p->ktime_ns > 10000000ULL)
		return 0;
	v = counters.lookup(&p->key);
	if (v && *v > 0)
		(*v)--; /* this CPU's slot, which the receive program just incremented */
#ifdef RSTTRACE_TOP
	if (p->top_in_row == 1) {
		v = top_counts.lookup(&p->top);
	} else if (p->top_in_row == 0) {
		u32 kind = RSTTRACE_KIND_RECEIVED;
		v = top_spill.lookup(&kind);
	} else {
		v = 0;
	}
	if (v && *v > 0)
		(*v)--; /* likewise: top_event() just counted the receive on this CPU */
#endif
	ret = p->admitted ? 2 : 1;
	return ret;
}

#ifdef RSTTRACE_TOP
/* One event's row in the top map: as counter_key() with the tuple (no remote port) and owner. */
static __always_inline void top_event(const struct rsttrace_event *e)
{
	struct rsttrace_top_key k = {};
	u32 zero = 0, kind;
	u64 *v, one = 1;
	int in_row = 1;
	struct rsttrace_rx_pending *p;

	k.netns = e->netns;
	k.reason = e->reason;
	k.kind = e->kind;
	k.port = e->lport;
	/* A client is keyed by the peer's port, or a client-side storm would take one key per
	 * connection: a socket still connecting (SYN_SENT: a refused connect), or one on an ephemeral
	 * port talking to a peer's non-ephemeral one. A closed port's reset (no socket) keeps the
	 * local port, which a scan chooses. */
	if (e->state == RSTTRACE_TOP_SYN_SENT && e->rport) {
		k.port = e->rport;
		k.port_remote = 1;
	}
#if defined(RSTTRACE_EPH_LO) && defined(RSTTRACE_EPH_HI)
	else if (e->state && e->state != RSTTRACE_TCP_LISTEN && e->lport >= RSTTRACE_EPH_LO &&
		 e->lport <= RSTTRACE_EPH_HI && e->rport && (e->rport < RSTTRACE_EPH_LO || e->rport > RSTTRACE_EPH_HI)) {
		k.port = e->rport;
		k.port_remote = 1;
	}
#endif
	k.state = e->state;
	k.family = (u8)e->family;
	k.flags = e->flags & (RSTTRACE_F_REQUEST_SOCK | RSTTRACE_F_SYNCOOKIE);
	if (e->kind == RSTTRACE_KIND_SENT && e->reason == RSTTRACE_REASON_NONE)
		k.flags |= e->flags & (RSTTRACE_F_ACTIVE | RSTTRACE_F_LOCAL_ABORT);
	if (e->flags & RSTTRACE_F_PROCESS) {
		k.flags |= RSTTRACE_F_PROCESS;
		k.pid = e->pid;
		__builtin_memcpy(k.comm, e->comm, sizeof(k.comm));
	}
	__builtin_memcpy(k.laddr, e->laddr, 16);
	__builtin_memcpy(k.raddr, e->raddr, 16);

#ifdef RSTTRACE_TOP_NETNS
	/* top --netns: only these namespaces take keys (a storm elsewhere cannot fill the map) */
	if (!RSTTRACE_TOP_NETNS(e->netns))
		in_row = 2;
	else
#endif
	if ((v = top_counts.lookup(&k))) {
		(*v)++; /* per-CPU slot: exact without atomics, as count() */
	} else if (top_counts.update(&k, &one) != 0) {
		/* full: a row without a tuple, by kind (BPF_ANY on a key another CPU just inserted
		 * writes only this CPU's slot, still 0, as in count()) */
		kind = k.kind;
		v = top_spill.lookup(&kind);
		if (v)
			(*v)++;
		in_row = 0;
	}
	/* A receive that the next send on this CPU may take back (rx_remember()): say where it went. */
	if (e->kind == RSTTRACE_KIND_RECEIVED && (e->state == RSTTRACE_TCP_FIN_WAIT1 || e->state == RSTTRACE_TCP_FIN_WAIT2)) {
		p = rx_pending.lookup(&zero);
		if (p) {
			__builtin_memcpy(&p->top, &k, sizeof(k));
			p->top_in_row = in_row;
		}
	}
}
#endif

/* The family of a sockaddr_in/in6 as the 6.10+ tracepoints store them (28 bytes, in ctx). */
static __always_inline u16 sockaddr_family(const u8 *sa)
{
	u16 fam = 0;
	__builtin_memcpy(&fam, sa, 2);
	return fam;
}

/* The two address layouts of tcp_send_reset/tcp_receive_reset records: 6.10+ sockaddrs
 * (saddr/daddr, 28 bytes each), older split fields (sport, dport, saddr[4], saddr_v6[16]...).
 * Macros, since the two records are different structs with the same field names. */
#define COPY_SOCKADDRS(args, e)                                            \
	do {                                                               \
		u8 sa[28];                                                 \
		__builtin_memcpy(sa, (args)->saddr, sizeof(sa));           \
		from_sockaddr(sa, (e).laddr, &(e).lport, &(e).family);     \
		__builtin_memcpy(sa, (args)->daddr, sizeof(sa));           \
		from_sockaddr(sa, (e).raddr, &(e).rport, &(e).family);     \
	} while (0)
#define COPY_SPLIT_ADDRS(args, e)                                          \
	do {                                                               \
		(e).lport = (args)->sport;                                 \
		(e).rport = (args)->dport;                                 \
		if ((e).family == RSTTRACE_AF_INET6) {                     \
			__builtin_memcpy((e).laddr, (args)->saddr_v6, 16); \
			__builtin_memcpy((e).raddr, (args)->daddr_v6, 16); \
		} else {                                                   \
			__builtin_memcpy((e).laddr, (args)->saddr, 4);     \
			__builtin_memcpy((e).raddr, (args)->daddr, 4);     \
		}                                                          \
	} while (0)

/* --- raw tracepoints: struct sock_common read once ------------------------------------ */
#ifdef RSTTRACE_SKC_LEN
/*
 * The head of struct sock_common (family, state, netns pointer, ports, addresses) in one
 * bpf_probe_read_kernel: each read is a helper call (~30-50 ns on a VM), and a raw program
 * has no record to copy from. TIME_WAIT and request sockets begin with a whole sock_common
 * too (struct inet_timewait_sock.__tw_common, struct request_sock.__req_common), so this read
 * never runs past what they have. RSTTRACE_SKC_LEN covers the furthest field used (from BTF).
 */
struct rsttrace_skc {
	u8 b[RSTTRACE_SKC_LEN];
};

#define SKC_GET(c, off, dst) __builtin_memcpy(&(dst), (c)->b + (off), sizeof(dst))

/* Family, state and netns: what counting needs. */
static __always_inline void skc_head(const void *sk, struct rsttrace_skc *c, struct rsttrace_event *e)
{
	const void *net = 0;
	u16 family = 0;
	u8 state = 0;

	bpf_probe_read_kernel(c, sizeof(*c), sk);
	SKC_GET(c, OFF_SK_FAMILY, family);
	SKC_GET(c, OFF_SK_STATE, state);
	SKC_GET(c, OFF_SK_NET, net);
	e->family = family;
	e->state = state;
	net_ident(net, e);
}

/* A full socket's own 4-tuple, as the tracepoints store it (TP_STORE_ADDR_PORTS). */
static __always_inline void skc_addrs(const void *sk, const struct rsttrace_skc *c, struct rsttrace_event *e)
{
	u16 num = 0, dport = 0;

	SKC_GET(c, OFF_SK_NUM, num); /* skc_num is host order, skc_dport network order */
	SKC_GET(c, OFF_SK_DPORT, dport);
	e->lport = num;
	e->rport = rst_ntohs(dport);
#if OFF_INET_SPORT >= 0
	/* The tracepoints use inet_sport: close() moves the socket to TCP_CLOSE before its reset,
	 * and that releases the bound port (inet_put_port() zeroes skc_num) but not inet_sport. */
	{
		u16 sport = 0;
		bpf_probe_read_kernel(&sport, sizeof(sport), (const char *)sk + OFF_INET_SPORT);
		e->lport = rst_ntohs(sport);
	}
#endif
	if (e->family == RSTTRACE_AF_INET) {
		__builtin_memcpy(e->laddr, c->b + OFF_SK_RCV_SADDR, 4);
		__builtin_memcpy(e->raddr, c->b + OFF_SK_DADDR, 4);
	}
#if OFF_SK_V6_RCV_SADDR >= 0 && OFF_SK_V6_DADDR >= 0
	else if (e->family == RSTTRACE_AF_INET6) {
		__builtin_memcpy(e->laddr, c->b + OFF_SK_V6_RCV_SADDR, 16);
		__builtin_memcpy(e->raddr, c->b + OFF_SK_V6_DADDR, 16);
	}
#endif
}

/* Address family of a packet without a socket: skb->protocol (ETH_P_IP / ETH_P_IPV6). */
static __always_inline u16 skb_family(const void *skb)
{
	u16 proto = 0;
#if OFF_SKB_PROTOCOL >= 0
	bpf_probe_read_kernel(&proto, sizeof(proto), (const char *)skb + OFF_SKB_PROTOCOL);
#endif
	if (proto == rst_ntohs(0x0800))
		return RSTTRACE_AF_INET;
	if (proto == rst_ntohs(0x86DD))
		return RSTTRACE_AF_INET6;
	return 0;
}
#endif

/* --- tcp:tcp_send_reset -------------------------------------------------------------- */
#ifdef HAVE_TP_SEND_RESET
/* sk_fullsock(): TIME_WAIT and request mini-sockets (6.10+ passes them) end where struct sock's
 * own fields begin; only struct sock_common may be read from them. */
static __always_inline int sent_fullsock(const void *sk, const struct rsttrace_event *e)
{
	return sk && e->state != RSTTRACE_TCP_TIME_WAIT && e->state != RSTTRACE_TCP_NEW_SYN_RECV;
}

/* Before counting. Without the kernel's reason, the inferred one depends on whether the owner
 * was closing the socket, so the owner is part of the counter key. */
static __always_inline void sent_key_owner(const void *sk, int fullsock, struct rsttrace_event *e)
{
#ifndef SEND_HAS_REASON
	if (fullsock && e->state != RSTTRACE_TCP_LISTEN)
		owner(sk, e);
#endif
}

/* After admit(), once the addresses are in: what only an event carries. */
static __always_inline void sent_details(const void *sk, const void *skb, int fullsock, struct rsttrace_event *e)
{
	if (!sk)
		return;
	e->cookie = sk_cookie(sk);
	/* tcp_check_req passes the listener (net/ipv4/tcp_minisocks.c embryonic_reset): its
	 * addresses are the bind address; the packet has the real peer. */
	if (e->state == RSTTRACE_TCP_LISTEN && skb) {
		peer_from_packet(skb, e);
	} else if (fullsock) {
#ifdef SEND_HAS_REASON
		owner(sk, e);
#endif
		e->cgroup_id = sk_cgroup_id(sk);
	}
}
#endif

#if defined(HAVE_TP_SEND_RESET) && defined(RAW_SEND_RESET)
/*
 * Raw: trace_tcp_send_reset(sk, skb[, reason]) as called (net/ipv4/tcp_ipv4.c,
 * tcp_v4_send_reset and tcp_send_active_reset). The record the perf tracepoint would have
 * built is rebuilt here only for events that pass admit(); a counted-only reset costs one
 * read of sock_common and one of net->ns.inum.
 */
int rsttrace_send_reset(struct bpf_raw_tracepoint_args *ctx)
{
	struct rsttrace_event e = {};
	struct rsttrace_skc c = {}; /* read only when sk is set; zeroed so no path reads it uninit */
	const void *sk = (const void *)ctx->args[RAW_SEND_RESET_SK];
	const void *skb = (const void *)ctx->args[RAW_SEND_RESET_SKB];
	int fullsock, back;

	e.kind = RSTTRACE_KIND_SENT;
#ifdef RAW_SEND_RESET_REASON
	e.reason = (u16)ctx->args[RAW_SEND_RESET_REASON];
#else
	e.reason = RSTTRACE_REASON_NONE;
#endif
	if (!skb)
		e.flags |= RSTTRACE_F_ACTIVE;
	if (sk) {
		skc_head(sk, &c, &e);
	} else if (skb) {
		e.family = skb_family(skb);
		skb_dev_netns(skb, &e);
		e.flags |= RSTTRACE_F_NETNS_FROM_DEV;
	}
	fullsock = sent_fullsock(sk, &e);
	sent_key_owner(sk, fullsock, &e);
	back = (skb && fullsock) ? rx_take_back(sk) : 0;
	if (back)
		e.flags |= RSTTRACE_F_LOCAL_ABORT;
	count_event(&e);
	if (!(back == 2 ? admit_correction(&e) : admit(&e)))
		return 0;

	/* As the tracepoint's record: a full socket's own tuple, else the packet's reversed
	 * (include/trace/events/tcp.h, TP_STORE_ADDR_PORTS / TP_STORE_ADDR_PORTS_SKB). */
	if (fullsock)
		skc_addrs(sk, &c, &e);
	else if (skb)
		skb_tuple(skb, &e);
	sent_details(sk, skb, fullsock, &e);
	emit(ctx, &e);
	return 0;
}
#elif defined(HAVE_TP_SEND_RESET)
int rsttrace_send_reset(struct rsttrace_tp_send_reset *args)
{
	struct rsttrace_event e = {};
	const void *sk = (const void *)args->skaddr;
	const void *skb = (const void *)args->skbaddr;
	int fullsock, back;

	e.kind = RSTTRACE_KIND_SENT;
#ifdef SEND_HAS_REASON
	e.reason = args->reason;
#else
	e.reason = RSTTRACE_REASON_NONE;
#endif
#ifdef SEND_HAS_STATE
	e.state = (u8)args->state;
#else
	if (sk)
		e.state = sk_state(sk);
#endif
	if (!skb)
		e.flags |= RSTTRACE_F_ACTIVE;
	fullsock = sent_fullsock(sk, &e);
#ifdef SEND_ADDR_SOCKADDR
	e.family = sockaddr_family(args->saddr);
#elif defined(SEND_HAS_FAMILY)
	e.family = args->family;
#else
	if (sk)
		e.family = sk_family(sk);
#endif
	if (sk) {
		sk_netns(sk, &e);
	} else if (skb) {
		skb_dev_netns(skb, &e);
		e.flags |= RSTTRACE_F_NETNS_FROM_DEV;
	}
	sent_key_owner(sk, fullsock, &e);
	back = (skb && fullsock) ? rx_take_back(sk) : 0;
	if (back)
		e.flags |= RSTTRACE_F_LOCAL_ABORT;
	count_event(&e);
	if (!(back == 2 ? admit_correction(&e) : admit(&e)))
		return 0;

	/* Addresses copied straight from the record (ctx): no helper call per field. */
#ifdef SEND_ADDR_SOCKADDR
	COPY_SOCKADDRS(args, e);
#else
	COPY_SPLIT_ADDRS(args, e);
#endif
	sent_details(sk, skb, fullsock, &e);
	emit(args, &e);
	return 0;
}
#endif

/* --- tcp:tcp_receive_reset ----------------------------------------------------------- */
#if defined(HAVE_TP_RECEIVE_RESET) && defined(RAW_RECEIVE_RESET)
/* Raw: trace_tcp_receive_reset(sk) from tcp_reset() (net/ipv4/tcp_input.c): always a full
 * socket. The cookie is the socket's if one was ever made (the perf tracepoint's record makes
 * one, sock_gen_cookie(); a raw program cannot). */
int rsttrace_receive_reset(struct bpf_raw_tracepoint_args *ctx)
{
	struct rsttrace_event e = {};
	struct rsttrace_skc c; /* filled by skc_head()'s read (zeroed by it on a fault) */
	const void *sk = (const void *)ctx->args[RAW_RECEIVE_RESET_SK];

	if (!sk)
		return 0;
	e.kind = RSTTRACE_KIND_RECEIVED;
	e.reason = RSTTRACE_REASON_NONE;
	skc_head(sk, &c, &e);
	count_event(&e);
	rx_remember(sk, &e);
	if (!admit(&e))
		return 0;
	rx_admitted(sk);
	skc_addrs(sk, &c, &e);
	e.cookie = sk_cookie(sk);
	owner(sk, &e);
	e.cgroup_id = sk_cgroup_id(sk);
	emit(ctx, &e);
	return 0;
}
#elif defined(HAVE_TP_RECEIVE_RESET)
int rsttrace_receive_reset(struct rsttrace_tp_receive_reset *args)
{
	struct rsttrace_event e = {};
	const void *sk = (const void *)args->skaddr;

	e.kind = RSTTRACE_KIND_RECEIVED;
	e.reason = RSTTRACE_REASON_NONE;
#ifdef RECV_ADDR_SOCKADDR
	e.family = sockaddr_family(args->saddr);
#elif defined(RECV_HAS_FAMILY)
	e.family = args->family;
#else
	if (sk)
		e.family = sk_family(sk);
#endif
	if (sk) {
		e.state = sk_state(sk);
		sk_netns(sk, &e);
	}
	count_event(&e);
	rx_remember(sk, &e);
	if (!admit(&e))
		return 0;
	rx_admitted(sk);

#ifdef RECV_ADDR_SOCKADDR
	COPY_SOCKADDRS(args, e);
#else
	COPY_SPLIT_ADDRS(args, e);
#endif
#ifdef RECV_HAS_COOKIE
	e.cookie = args->sock_cookie;
#endif
	if (sk) {
#ifndef RECV_HAS_COOKIE
		e.cookie = sk_cookie(sk);
#endif
		owner(sk, &e);
		e.cgroup_id = sk_cgroup_id(sk);
	}
	emit(args, &e);
	return 0;
}
#endif

/* --- skb:kfree_skb: packets a listener dropped ------------------------------------------ */
#ifdef HAVE_TP_KFREE_SKB

/* Final ACK meeting a full accept queue: the listener (rx_sk), or the packet's device when the
 * kernel had none. */
static __always_inline int listen_overflow(void *ctx, const void *sk, const void *skb, u32 reason, u8 flags)
{
	struct rsttrace_event e = {};

	e.kind = RSTTRACE_KIND_LISTEN_OVERFLOW_ACK;
	e.reason = reason;
	e.flags = flags;
	if (sk) {
		e.state = sk_state(sk);
		sk_netns(sk, &e);
		sk_local(sk, &e); /* the listener's port: part of the key */
	} else {
		skb_dev_netns(skb, &e);
		e.flags |= RSTTRACE_F_NETNS_FROM_DEV;
	}
	count_event(&e);
	if (!admit(&e))
		return 0;
	if (sk) {
#if OFF_SK_ACK_BACKLOG >= 0 && OFF_SK_MAX_ACK_BACKLOG >= 0
		bpf_probe_read_kernel(&e.backlog, sizeof(e.backlog), (const char *)sk + OFF_SK_ACK_BACKLOG);
		bpf_probe_read_kernel(&e.max_backlog, sizeof(e.max_backlog),
				      (const char *)sk + OFF_SK_MAX_ACK_BACKLOG);
#endif
	}
	peer_from_packet(skb, &e);
	emit(ctx, &e);
	return 0;
}

#ifdef KFREE_HAS_RX_SK
/*
 * Drops with the listener as rx_sk (6.11+) that no reset hook sees, measured on 6.18:
 *  - NOT_SPECIFIED, a RST in the packet: it hit a request socket (SYN_RECV). tcp_check_req()
 *    counts AttemptFails and EmbryonicRsts and drops the request without calling tcp_reset()
 *    (net/ipv4/tcp_minisocks.c, embryonic_reset), then tcp_v4_rcv's discard path frees the
 *    packet. A RST to a listener with no request is dropped as TCP_RESET instead: not this.
 *  - NO_SOCKET with the accept queue full: a final ACK with a valid SYN cookie whose child could
 *    not be queued (net/ipv4/syncookies.c, cookie_v4_check: tcp_get_cookie_sock() found
 *    syn_recv_sock() failing, which counted ListenOverflows). No TCP_LISTEN_OVERFLOW fires there.
 */
static __always_inline int listener_drop(void *ctx, const void *sk, const void *skb, u32 reason)
{
	struct rsttrace_event e = {};
	u32 backlog = 0, max_backlog = 0;

	if (sk_state(sk) != RSTTRACE_TCP_LISTEN)
		return 0;
	if (reason == DROP_REASON_NO_SOCKET) {
#if OFF_SK_ACK_BACKLOG >= 0 && OFF_SK_MAX_ACK_BACKLOG >= 0
		bpf_probe_read_kernel(&backlog, sizeof(backlog), (const char *)sk + OFF_SK_ACK_BACKLOG);
		bpf_probe_read_kernel(&max_backlog, sizeof(max_backlog), (const char *)sk + OFF_SK_MAX_ACK_BACKLOG);
#endif
		if (backlog <= max_backlog) /* sk_acceptq_is_full(): not an overflow */
			return 0;
		return listen_overflow(ctx, sk, skb, reason, RSTTRACE_F_SYNCOOKIE);
	}
	if (!(skb_tcp_flags(skb) & 0x04))
		return 0; /* no RST: a SYN or bad ACK on a request, or an ACK overflow (counted elsewhere) */
	e.kind = RSTTRACE_KIND_RECEIVED;
	e.reason = RSTTRACE_REASON_NONE;
	e.flags = RSTTRACE_F_REQUEST_SOCK;
	e.state = RSTTRACE_TCP_SYN_RECV; /* the request's state; the socket passed is its listener */
	sk_netns(sk, &e);
	count_event(&e);
	if (!admit(&e))
		return 0;
	sk_local(sk, &e);
	peer_from_packet(skb, &e);
	emit(ctx, &e);
	return 0;
}
#endif

static __always_inline int kfree_skb(void *ctx, const void *skb, u32 reason, const void *rx_sk)
{
#ifdef DROP_REASON_LISTEN_OVERFLOW
	if (reason == DROP_REASON_LISTEN_OVERFLOW)
		return listen_overflow(ctx, rx_sk, skb, reason, 0);
#endif
#ifdef KFREE_HAS_RX_SK
	/* kfree_skb fires for every dropped packet: a compare or two and a NULL test, then leave.
	 * NO_SOCKET only where no syn_recv_sock kprobe counts cookie-path overflows already
	 * (KernelFacts.kfree_cookie_overflow): a closed-port storm is all NO_SOCKET drops. */
#ifdef KFREE_COOKIE_OVERFLOW
	if ((reason == DROP_REASON_NOT_SPECIFIED || reason == DROP_REASON_NO_SOCKET) && rx_sk)
#else
	if (reason == DROP_REASON_NOT_SPECIFIED && rx_sk)
#endif
		return listener_drop(ctx, rx_sk, skb, reason);
#endif
	return 0;
}
#endif

#if defined(HAVE_TP_KFREE_SKB) && defined(RAW_KFREE_SKB)
/* Raw: trace_kfree_skb(skb, location, reason, rx_sk) (net/core/skbuff.c). It fires for every
 * dropped packet, so the reason is tested before anything else: a register compare. */
int rsttrace_kfree_skb(struct bpf_raw_tracepoint_args *ctx)
{
	return kfree_skb(ctx, (const void *)ctx->args[RAW_KFREE_SKB_SKB], (u32)ctx->args[RAW_KFREE_SKB_REASON],
			 (const void *)ctx->args[RAW_KFREE_SKB_SK]);
}
#elif defined(HAVE_TP_KFREE_SKB)
int rsttrace_kfree_skb(struct rsttrace_tp_kfree_skb *args)
{
#ifdef KFREE_HAS_RX_SK
	const void *rx_sk = (const void *)args->rx_sk;
#else
	const void *rx_sk = 0;
#endif
	return kfree_skb(args, (const void *)args->skbaddr, args->reason, rx_sk);
}
#endif


/* --- kprobes, on kernels whose tracepoints leave gaps (chosen in rsttrace/kernel.py) ---- */

#ifdef HAVE_KP_SEND_RESET
/*
 * tcp_v4_send_reset(sk, skb) / tcp_v6_send_reset(sk, skb[, reason]) on entry. Before 6.10 the
 * tracepoint fires inside only for full sockets (net/ipv4/tcp_ipv4.c:
 * `if (sk && sk_fullsock(sk)) trace_tcp_send_reset(sk, skb)`), so full sockets return here at
 * once and nothing is counted twice: this probe adds no-socket (closed port) and TIME_WAIT
 * resets. Like the function, it sends nothing in reply to a RST (`if (th->rst) return;`).
 */
static __always_inline int kp_send_reset(struct pt_regs *ctx)
{
	const void *sk = (const void *)PT_REGS_PARM1(ctx);
	const void *skb = (const void *)PT_REGS_PARM2(ctx);
	struct rsttrace_event e = {};

	if (!skb)
		return 0;
	if (sk) {
		e.state = sk_state(sk);
		if (e.state != RSTTRACE_TCP_TIME_WAIT && e.state != RSTTRACE_TCP_NEW_SYN_RECV)
			return 0; /* a full socket: the tracepoint has it */
	}
	if (skb_tcp_flags(skb) & 0x04)
		return 0; /* TCP RST: never answered */
	e.kind = RSTTRACE_KIND_SENT;
	e.reason = RSTTRACE_REASON_NONE;
	e.flags = RSTTRACE_F_KPROBE;
	skb_tuple(skb, &e); /* the packet came in: its source is the remote side */
	if (sk) {
		sk_netns(sk, &e);
		e.cookie = sk_cookie(sk);
	} else {
		skb_dev_netns(skb, &e);
		e.flags |= RSTTRACE_F_NETNS_FROM_DEV;
	}
	count_event(&e);
	if (admit(&e))
		emit(ctx, &e);
	return 0;
}

int rsttrace_kp_send_reset(struct pt_regs *ctx)
{
	return kp_send_reset(ctx);
}
#endif

#if defined(HAVE_KP_SYN_RECV) || defined(HAVE_KP_CONN_REQUEST)
/*
 * A listener meeting its full accept queue: tcp_conn_request (a SYN) and tcp_v4_syn_recv_sock
 * (the final ACK) both test sk_acceptq_is_full() -- ack_backlog > max_ack_backlog
 * (include/net/sock.h) -- first thing and count ListenOverflows when it holds. The probe runs
 * the same test on entry; the queue can drain in between, so this is an estimate, and what
 * ListenOverflows counts beyond it is reported counter-derived.
 */
static __always_inline int kp_overflow(struct pt_regs *ctx, const void *sk, const void *skb, u16 kind, int v6)
{
	struct rsttrace_event e = {};

	if (!sk || !skb)
		return 0;
#if OFF_SK_ACK_BACKLOG >= 0 && OFF_SK_MAX_ACK_BACKLOG >= 0
	bpf_probe_read_kernel(&e.backlog, sizeof(e.backlog), (const char *)sk + OFF_SK_ACK_BACKLOG);
	bpf_probe_read_kernel(&e.max_backlog, sizeof(e.max_backlog), (const char *)sk + OFF_SK_MAX_ACK_BACKLOG);
#endif
	if (e.backlog <= e.max_backlog)
		return 0;
#if OFF_SKB_PROTOCOL >= 0
	if (v6) {
		/* tcp_v6_syn_recv_sock hands IPv4 packets (v4-mapped) to tcp_v4_syn_recv_sock,
		 * whose own probe counts them */
		u16 proto = 0;
		bpf_probe_read_kernel(&proto, sizeof(proto), (const char *)skb + OFF_SKB_PROTOCOL);
		if (proto == rst_ntohs(0x0800))
			return 0;
	}
#endif
	e.kind = kind;
	e.reason = RSTTRACE_REASON_NONE;
	e.flags = RSTTRACE_F_KPROBE;
	e.state = sk_state(sk);
	sk_netns(sk, &e);
	sk_local(sk, &e);
	peer_from_packet(skb, &e);
	count_event(&e);
	if (admit(&e))
		emit(ctx, &e);
	return 0;
}
#endif

#ifdef HAVE_KP_SYN_RECV
int rsttrace_kp_syn_recv(struct pt_regs *ctx)
{
	return kp_overflow(ctx, (const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM2(ctx),
			   RSTTRACE_KIND_LISTEN_OVERFLOW_ACK, 0);
}

int rsttrace_kp_syn_recv6(struct pt_regs *ctx)
{
	return kp_overflow(ctx, (const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM2(ctx),
			   RSTTRACE_KIND_LISTEN_OVERFLOW_ACK, 1);
}
#endif

#ifdef HAVE_KP_CONN_REQUEST
/* tcp_conn_request(rsk_ops, af_ops, sk, skb): the listener is the third argument */
int rsttrace_kp_conn_request(struct pt_regs *ctx)
{
	return kp_overflow(ctx, (const void *)PT_REGS_PARM3(ctx), (const void *)PT_REGS_PARM4(ctx),
			   RSTTRACE_KIND_LISTEN_OVERFLOW_SYN, 0);
}
#endif
