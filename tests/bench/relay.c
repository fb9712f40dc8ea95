/* relay: the bench's reference hop (tests/bench/run.sh). A minimal TCP relay
 * that copies bytes both ways and understands nothing, so the bench can
 * split "what any user-space hop on this host costs" (direct vs relay) from
 * "what qresyncd adds on top" (relay vs qresyncd).
 *
 *   relay LISTEN_PORT UPSTREAM_PORT     (both on 127.0.0.1)
 *
 * One poll() loop, non-blocking sockets, one 64 KiB buffer per direction:
 * a side is read only when its buffer is empty, and written to its peer
 * until it is. TCP_NODELAY both ways, as qresyncd (libuv) does. Runs until
 * killed. Plain C11 + POSIX. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE  (64 * 1024)
#define MAX_PAIRS 4096

struct dir {
    int from, to;
    size_t off, len;
    char buf[BUF_SIZE];
};

struct pair {
    struct dir d[2]; /* 0: client -> upstream, 1: upstream -> client */
    int is_open;
};

static struct pair *pairs[MAX_PAIRS];

static void set_sock(int fd)
{
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    (void)fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static struct sockaddr_in loopback(const char *port)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static void pair_close(struct pair *p)
{
    close(p->d[0].from);
    close(p->d[1].from);
    p->is_open = 0;
}

/* Moves what it can in one direction. Returns -1 when the pair is done. */
static int dir_pump(struct dir *d, short rev_from, short rev_to)
{
    if (d->len > d->off && (rev_to & (POLLOUT | POLLERR | POLLHUP))) {
        ssize_t w = write(d->to, d->buf + d->off, d->len - d->off);
        if (w < 0 && errno != EAGAIN && errno != EINTR)
            return -1;
        if (w > 0)
            d->off += (size_t)w;
        if (d->off == d->len)
            d->off = d->len = 0;
    }
    if (d->len == 0 && (rev_from & (POLLIN | POLLERR | POLLHUP))) {
        ssize_t r = read(d->from, d->buf, sizeof(d->buf));
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
            return -1;
        if (r > 0) {
            d->len = (size_t)r;
            ssize_t w = write(d->to, d->buf, d->len);
            if (w > 0)
                d->off = (size_t)w;
            if (d->off == d->len)
                d->off = d->len = 0;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    static struct pollfd pf[1 + 2 * MAX_PAIRS];
    static int pf_pair[1 + 2 * MAX_PAIRS];
    int one = 1, n_pairs = 0;

    if (argc != 3) {
        fputs("usage: relay LISTEN_PORT UPSTREAM_PORT\n", stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_in la = loopback(argv[1]), ua = loopback(argv[2]);
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    (void)setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (ls < 0 || bind(ls, (struct sockaddr *)&la, sizeof(la)) < 0 || listen(ls, 512) < 0) {
        perror("relay: listen");
        return 1;
    }
    for (;;) {
        nfds_t n = 0;
        pf[n].fd = ls;
        pf[n].events = POLLIN;
        pf_pair[n++] = -1;
        for (int i = 0; i < n_pairs; i++) {
            struct pair *p = pairs[i];
            if (!p->is_open)
                continue;
            for (int k = 0; k < 2; k++) {
                /* fd d[k].from: read when d[k] is empty, write d[1-k]'s bytes. */
                pf[n].fd = p->d[k].from;
                pf[n].events =
                    (short)((p->d[k].len == 0 ? POLLIN : 0) | (p->d[1 - k].len > 0 ? POLLOUT : 0));
                pf_pair[n++] = i;
            }
        }
        if (poll(pf, n, -1) < 0) {
            if (errno == EINTR)
                continue;
            perror("relay: poll");
            return 1;
        }
        for (nfds_t j = 1; j < n; j += 2) {
            struct pair *p = pairs[pf_pair[j]];
            short r0 = pf[j].revents, r1 = pf[j + 1].revents;
            if ((r0 | r1) == 0)
                continue;
            if (dir_pump(&p->d[0], r0, r1) < 0 || dir_pump(&p->d[1], r1, r0) < 0)
                pair_close(p);
        }
        if (pf[0].revents & POLLIN) {
            int c = accept(ls, NULL, NULL);
            if (c < 0)
                continue;
            int u = socket(AF_INET, SOCK_STREAM, 0);
            if (u < 0 || connect(u, (struct sockaddr *)&ua, sizeof(ua)) < 0) {
                perror("relay: upstream");
                close(c);
                if (u >= 0)
                    close(u);
                continue;
            }
            int slot = 0;
            while (slot < n_pairs && pairs[slot]->is_open)
                slot++;
            if (slot == MAX_PAIRS) {
                close(c);
                close(u);
                continue;
            }
            if (slot == n_pairs) {
                pairs[slot] = malloc(sizeof(struct pair));
                if (pairs[slot] == NULL) {
                    close(c);
                    close(u);
                    continue;
                }
                n_pairs++;
            }
            struct pair *p = pairs[slot];
            set_sock(c);
            set_sock(u);
            p->d[0].from = c;
            p->d[0].to = u;
            p->d[1].from = u;
            p->d[1].to = c;
            p->d[0].off = p->d[0].len = p->d[1].off = p->d[1].len = 0;
            p->is_open = 1;
        }
    }
}
