// SPDX-License-Identifier: Apache-2.0
/*
 * storm: a TCP reset storm on loopback, for rsttrace's benchmark (bench/run compiles it with the
 * system compiler and runs it inside a network namespace of its own).
 *
 *   storm [-m closed|overflow|abort] [-p PROCS] [-d SECONDS] [-n ITERATIONS] [-r RATE]
 *         [-P PEERS] [-b BATCH]
 *
 * Modes (one "iteration" each):
 *   closed    socket(), connect() to a closed port, close(): one RST sent (NO_SOCKET), one
 *             received (ECONNREFUSED in SYN_SENT). Nothing stays behind (no TIME_WAIT).
 *   abort     connect to a listener, send a byte, the listener accepts and closes with the byte
 *             unread: one RST sent (TCP_ABORT_ON_CLOSE, in process context), one received
 *             (ECONNRESET).
 *   overflow  final ACKs that meet a full accept queue. A TCP_DEFER_ACCEPT listener keeps
 *             completed handshakes as request sockets until data arrives, so a batch of clients
 *             is admitted while the queue is empty; listen() again with backlog 0; each client's
 *             first data is the ACK that creates the child, and every one past the first finds
 *             the queue full (kfree_skb TCP_LISTEN_OVERFLOW; with tcp_abort_on_overflow=1, which
 *             bench/run sets in the namespace, also a RST each way). One iteration is one
 *             overflowed ACK.
 *
 * -p processes run in parallel (default: one per online CPU), each for -d seconds or until -n
 * iterations in all are done. -r caps each process's rate (iterations/s) for no-loss sweeps.
 * -P spreads the closed storm over that many peers: the source address walks 127.1.0.0/16 and up
 * (all of 127.0.0.0/8 is local on lo) and the closed port walks 1000 ports, so a tracer sees a
 * port scan's shape.
 *
 * Prints one JSON line: {"mode", "procs", "iterations", "seconds", "per_sec", "errors"}.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum mode { CLOSED, ABORT, OVERFLOW };

struct result {
	uint64_t iterations;
	uint64_t errors;
	double seconds;
};

struct config {
	enum mode mode;
	int procs;
	double duration;
	uint64_t limit; /* per process; 0 = none */
	double rate;    /* per process; 0 = as fast as possible */
	uint64_t peers;
	int batch;
};

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* A loopback port nothing listens on: bind to port 0, read the port, close. */
static uint16_t free_port(void)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
	    getsockname(fd, (struct sockaddr *)&a, &len) < 0)
		die("free_port");
	close(fd);
	return ntohs(a.sin_port);
}

static int listener(int backlog, int defer, uint16_t *port)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(a);
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (defer && setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, sizeof(defer)) < 0)
		die("TCP_DEFER_ACCEPT");
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, backlog) < 0 ||
	    getsockname(fd, (struct sockaddr *)&a, &len) < 0)
		die("listener");
	*port = ntohs(a.sin_port);
	return fd;
}

static void linger0(int fd)
{
	struct linger l = {.l_onoff = 1, .l_linger = 0};
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
}

/* One closed-port connect; returns 0 when it was refused as expected. */
static int closed_once(uint16_t port, uint64_t peer, int spread)
{
	struct sockaddr_in dst = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	int fd = socket(AF_INET, SOCK_STREAM, 0), rc = 0;
	if (fd < 0)
		return -1;
	dst.sin_port = htons(port);
	if (spread) {
		/* 127.1.0.0 + peer: never .0.0.0 nor the /8 broadcast for up to 16 M peers. The
		 * kernel still picks the source port; NO_PORT defers that to connect() (cheaper). */
		struct sockaddr_in src = {.sin_family = AF_INET};
		int one = 1;
		src.sin_addr.s_addr = htonl(0x7f010000u + (uint32_t)(peer % 0xfe0000u));
		dst.sin_port = htons((uint16_t)(port + peer % 1000));
		setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
		if (bind(fd, (struct sockaddr *)&src, sizeof(src)) < 0)
			rc = -1;
	}
	if (rc == 0 && (connect(fd, (struct sockaddr *)&dst, sizeof(dst)) == 0 || errno != ECONNREFUSED))
		rc = -1;
	close(fd);
	return rc;
}

static int abort_once(int lfd, uint16_t port)
{
	struct sockaddr_in dst = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	int fd = socket(AF_INET, SOCK_STREAM, 0), afd, rc = 0;
	char b = 'x';
	if (fd < 0)
		return -1;
	dst.sin_port = htons(port);
	/* On loopback the handshake completes inside connect(); the byte is queued on the child. */
	if (connect(fd, (struct sockaddr *)&dst, sizeof(dst)) < 0 || send(fd, &b, 1, 0) != 1) {
		close(fd);
		return -1;
	}
	afd = accept(lfd, NULL, NULL);
	if (afd < 0)
		rc = -1;
	else
		close(afd); /* unread data: the kernel resets the connection (TCP_ABORT_ON_CLOSE) */
	close(fd);      /* already reset: no FIN, no TIME_WAIT */
	return rc;
}

/* One batch of the overflow storm; returns the overflowed ACKs (batch - 1 when all went well). */
static int overflow_batch(int lfd, uint16_t port, int batch, int *fds, uint64_t *errors)
{
	struct sockaddr_in dst = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	char b = 'x';
	int i, n = 0, afd;
	dst.sin_port = htons(port);
	if (listen(lfd, batch) < 0)
		die("listen");
	for (i = 0; i < batch; i++) {
		fds[i] = socket(AF_INET, SOCK_STREAM, 0);
		if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)&dst, sizeof(dst)) < 0) {
			(*errors)++;
			if (fds[i] >= 0)
				close(fds[i]);
			fds[i] = -1;
		}
	}
	/* Backlog 0 admits one child (the queue is full when its length exceeds the backlog). */
	if (listen(lfd, 0) < 0)
		die("listen");
	for (i = 0; i < batch; i++)
		if (fds[i] >= 0 && send(fds[i], &b, 1, MSG_NOSIGNAL) == 1)
			n++;
	/* Take the one child so the next batch starts with an empty queue; the rest are gone. */
	while ((afd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
		linger0(afd);
		close(afd);
		n--;
	}
	for (i = 0; i < batch; i++) {
		if (fds[i] >= 0) {
			linger0(fds[i]);
			close(fds[i]);
		}
	}
	return n > 0 ? n : 0;
}

static struct result worker(const struct config *c, int index)
{
	struct result r = {0};
	uint64_t peer = (uint64_t)index, check = 0;
	uint16_t port = 0;
	int lfd = -1, *fds = NULL;
	double start, deadline, t;

	if (c->mode == CLOSED) {
		port = c->peers ? 10000 : free_port();
	} else if (c->mode == ABORT) {
		lfd = listener(1024, 0, &port);
	} else {
		lfd = listener(c->batch, 30, &port);
		/* accept() must not wait when the batch's one child did not make it */
		if (fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK) < 0)
			die("fcntl");
		fds = calloc((size_t)c->batch, sizeof(int));
		if (!fds)
			die("calloc");
	}
	start = now();
	deadline = start + c->duration;
	for (;;) {
		int n = 1;
		if (c->mode == CLOSED) {
			if (closed_once(port, peer, c->peers != 0) != 0)
				r.errors++;
			peer += (uint64_t)c->procs;
			if (c->peers && peer >= c->peers)
				peer %= c->peers;
		} else if (c->mode == ABORT) {
			if (abort_once(lfd, port) != 0)
				r.errors++;
		} else {
			n = overflow_batch(lfd, port, c->batch, fds, &r.errors);
		}
		r.iterations += (uint64_t)n;
		if (c->limit && r.iterations >= c->limit)
			break;
		/* Reading the clock costs ~20 ns; every 64 iterations keeps it out of the profile. */
		if (++check % 64 && !c->rate)
			continue;
		t = now();
		if (t >= deadline)
			break;
		if (c->rate) {
			double ahead = (double)r.iterations / c->rate - (t - start);
			if (ahead > 0.0002) {
				struct timespec ts = {0, (long)(ahead * 1e9)};
				nanosleep(&ts, NULL);
			}
		}
	}
	r.seconds = now() - start;
	if (lfd >= 0)
		close(lfd);
	free(fds);
	return r;
}

static void usage(void)
{
	fprintf(stderr, "usage: storm [-m closed|overflow|abort] [-p PROCS] [-d SECONDS] [-n ITERATIONS] "
			"[-r RATE] [-P PEERS] [-b BATCH]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct config c = {.mode = CLOSED, .duration = 5.0, .batch = 64};
	struct result total = {0};
	uint64_t limit = 0;
	int opt, i, pipes[2];
	pid_t *pids;

	c.procs = (int)sysconf(_SC_NPROCESSORS_ONLN);
	while ((opt = getopt(argc, argv, "m:p:d:n:r:P:b:")) != -1) {
		switch (opt) {
		case 'm':
			if (!strcmp(optarg, "closed"))
				c.mode = CLOSED;
			else if (!strcmp(optarg, "abort"))
				c.mode = ABORT;
			else if (!strcmp(optarg, "overflow"))
				c.mode = OVERFLOW;
			else
				usage();
			break;
		case 'p': c.procs = atoi(optarg); break;
		case 'd': c.duration = atof(optarg); break;
		case 'n': limit = strtoull(optarg, NULL, 10); break;
		case 'r': c.rate = atof(optarg); break;
		case 'P': c.peers = strtoull(optarg, NULL, 10); break;
		case 'b': c.batch = atoi(optarg); break;
		default: usage();
		}
	}
	if (c.procs < 1 || c.duration <= 0 || c.batch < 2 || c.rate < 0)
		usage();
	if (limit)
		c.limit = (limit + (uint64_t)c.procs - 1) / (uint64_t)c.procs;
	if (!limit && c.duration > 1e6)
		usage();
	pids = calloc((size_t)c.procs, sizeof(pid_t));
	if (!pids || pipe(pipes) < 0)
		die("setup");
	for (i = 0; i < c.procs; i++) {
		pids[i] = fork();
		if (pids[i] < 0)
			die("fork");
		if (pids[i] == 0) {
			struct result r;
			close(pipes[0]);
			r = worker(&c, i);
			if (write(pipes[1], &r, sizeof(r)) != (ssize_t)sizeof(r))
				_exit(1);
			_exit(0);
		}
	}
	close(pipes[1]);
	for (i = 0; i < c.procs; i++) {
		struct result r;
		if (read(pipes[0], &r, sizeof(r)) != (ssize_t)sizeof(r)) {
			fprintf(stderr, "storm: a worker died\n");
			return 1;
		}
		total.iterations += r.iterations;
		total.errors += r.errors;
		/* Workers start within microseconds of each other; the slowest sets the duration. */
		if (r.seconds > total.seconds)
			total.seconds = r.seconds;
	}
	for (i = 0; i < c.procs; i++)
		waitpid(pids[i], NULL, 0);
	printf("{\"mode\": \"%s\", \"procs\": %d, \"iterations\": %llu, \"seconds\": %.6f, "
	       "\"per_sec\": %.1f, \"errors\": %llu}\n",
	       c.mode == CLOSED ? "closed" : c.mode == ABORT ? "abort" : "overflow", c.procs,
	       (unsigned long long)total.iterations, total.seconds,
	       total.seconds > 0 ? (double)total.iterations / total.seconds : 0.0,
	       (unsigned long long)total.errors);
	return 0;
}
