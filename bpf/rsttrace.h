/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * rsttrace contract: the records the BPF programs hand to user space. Every program includes
 * this header, and rsttrace/contract.py mirrors it with ctypes; tests/unit/test_contract.py
 * compiles this file and checks that sizes and offsets agree. Change both together.
 *
 * Raw numbers only: reasons and states are the running kernel's enum values, named in user
 * space from that kernel's tracefs format files and BTF (never from a table compiled in here).
 */
#ifndef RSTTRACE_H
#define RSTTRACE_H

/* What happened. */
enum rsttrace_kind {
	RSTTRACE_KIND_SENT = 1,                /* tcp:tcp_send_reset */
	RSTTRACE_KIND_RECEIVED = 2,            /* tcp:tcp_receive_reset */
	RSTTRACE_KIND_LISTEN_OVERFLOW_SYN = 3, /* SYN dropped: accept queue full */
	RSTTRACE_KIND_LISTEN_OVERFLOW_ACK = 4, /* final ACK dropped: accept queue full */
	RSTTRACE_KIND_SYN_QUEUE_OVERFLOW = 5,  /* SYN queue full: dropped or answered with a cookie */
	RSTTRACE_KIND_LISTEN_DROP = 6,         /* SYN dropped by the listener for another reason (counters) */
	RSTTRACE_KIND_MAX = 7,
};

/* The hook passed no reason (tcp_send_reset before 6.10, tcp_receive_reset). */
#define RSTTRACE_REASON_NONE 0xffffffffU

/* Address families: uapi values (include/linux/socket.h), fixed ABI. */
#define RSTTRACE_AF_INET 2
#define RSTTRACE_AF_INET6 10

enum rsttrace_flags {
	/* pid/comm belong to the socket's owner: the socket lock was held by a task
	 * (close, shutdown, disconnect, abort, or backlog processing at release_sock). */
	RSTTRACE_F_PROCESS = 1 << 0,
	/* No packet triggered it: an active reset the kernel decided on (close, abort, timers). */
	RSTTRACE_F_ACTIVE = 1 << 1,
	/* The kernel passed the listener socket; addresses come from the packet instead. */
	RSTTRACE_F_PEER_FROM_SKB = 1 << 2,
	/* No socket: the network namespace is the receiving device's. */
	RSTTRACE_F_NETNS_FROM_DEV = 1 << 3,
	/* Seen by a kprobe (older kernels' gaps), not a tracepoint. */
	RSTTRACE_F_KPROBE = 1 << 4,
	/* A passive reset the local kernel decided while tcp_reset() ran on the same socket just
	 * before: data for a socket already shut down (TCPAbortOnData). tcp:tcp_receive_reset fired
	 * for it although no RST arrived, so that count was taken back (see the send programs). */
	RSTTRACE_F_LOCAL_ABORT = 1 << 5,
	/* A RST that hit a request socket (SYN_RECV): seen at the packet's drop, with the listener. */
	RSTTRACE_F_REQUEST_SOCK = 1 << 6,
	/* A final ACK with a valid SYN cookie that met a full accept queue (the cookie path). */
	RSTTRACE_F_SYNCOOKIE = 1 << 7,
};

struct rsttrace_event {
	__u64 ktime_ns;    /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cookie;      /* socket cookie, 0 when none was assigned or no socket */
	__u64 cgroup_id;   /* cgroup v2 id of the socket's owner, 0 when unknown */
	__u32 netns;       /* network namespace inode */
	__u32 pid;         /* tgid, valid only with RSTTRACE_F_PROCESS */
	__u32 reason;      /* raw enum value (sk_rst_reason or skb_drop_reason), or RSTTRACE_REASON_NONE */
	__u32 backlog;     /* listener's accept queue length (listen overflows) */
	__u32 max_backlog; /* listener's accept queue limit (listen overflows) */
	__u32 netns_gen;   /* the namespace's never-reused id, low 32 bits (ns_id or net_cookie), 0 if none */
	__u16 kind;        /* enum rsttrace_kind */
	__u16 family;      /* RSTTRACE_AF_INET / RSTTRACE_AF_INET6, 0 when unknown */
	__u16 lport;       /* host byte order, local side as seen from this host */
	__u16 rport;       /* host byte order, remote side */
	__u8 state;        /* raw TCP state, 0 when there was no socket */
	__u8 flags;        /* enum rsttrace_flags */
	__u8 pad[6];
	__u8 laddr[16];    /* IPv4 in the first 4 bytes */
	__u8 raddr[16];
	char comm[16];     /* valid only with RSTTRACE_F_PROCESS */
};

/* Key of the exact in-kernel counters (a per-CPU hash: no atomics, no loss under load). */
struct rsttrace_counter_key {
	__u32 netns;
	__u32 netns_gen; /* see rsttrace_event: a reused inode is a new key */
	__u32 reason; /* raw, or RSTTRACE_REASON_NONE */
	__u16 kind;
	__u16 port;   /* listening port for listen overflows, 0 otherwise (bounded cardinality) */
	__u8 state;
	__u8 family;
	/* Only when reason is RSTTRACE_REASON_NONE: the F_ACTIVE, F_PROCESS and F_LOCAL_ABORT bits,
	 * which the user-space reason inference needs, so counters and events infer alike; and
	 * F_REQUEST_SOCK / F_SYNCOOKIE on any kernel (the received and overflow kinds they mark). */
	__u8 flags;
	__u8 pad;
};

/*
 * Key of the "top" map (rsttrace top only, compiled in with RSTTRACE_TOP): who resets whom. A
 * per-CPU hash of RSTTRACE_TOP_ENTRIES keys (default below; `rsttrace top --max-keys`), never
 * deleted from while it runs, so every row is exact since start; a reset whose key finds the map
 * full is counted in "top_spill" by kind (a row without addresses), so rows + spill = every
 * reset counted, exactly. The remote port is not part of it (ephemeral: one key per connection).
 */
struct rsttrace_top_key {
	__u32 netns;
	__u32 reason; /* raw, or RSTTRACE_REASON_NONE */
	__u32 pid;    /* tgid when RSTTRACE_F_PROCESS is in flags (the owner in process context), else 0 */
	__u16 kind;
	__u16 port;   /* host byte order: the local port, or the remote one when port_remote */
	__u8 state;
	__u8 family;
	__u8 flags;   /* as rsttrace_counter_key's, plus RSTTRACE_F_PROCESS when pid is set */
	/* 1: a local socket's port is ephemeral (ip_local_port_range) and the peer's is not: a client,
	 * keyed by the service it talks to rather than by one key per connection */
	__u8 port_remote;
	__u8 laddr[16]; /* IPv4 in the first 4 bytes */
	__u8 raddr[16];
	char comm[16];  /* with pid: the owner's name then (it outlives the process in the rows) */
};

#define RSTTRACE_TOP_ENTRIES_DEFAULT 10240

/* Slots of the per-CPU "stats" array. */
enum rsttrace_stat {
	RSTTRACE_STAT_EVENTS = 0,        /* events handed to the ring/perf buffer */
	RSTTRACE_STAT_BUFFER_FULL = 1,   /* events lost: ring or perf buffer full */
	RSTTRACE_STAT_COUNTER_FULL = 2,  /* counter map full: counted in "counters_spill" by kind */
	RSTTRACE_STAT_SUPPRESSED = 3,    /* events held back by the rate limit (counted all the same) */
	RSTTRACE_STAT_MAX = 4,
};

#endif /* RSTTRACE_H */
