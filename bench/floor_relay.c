/* The floor of a verifying, caching blob relay: the least work any mirror that verifies a
 * blob's digest and caches it before the client has the last byte must do, in C, with no
 * interpreter, framework or event loop. bench/floor.py builds and runs it.
 *
 *   floor_relay PORT UPSTREAM_PORT PATH SPOOL MODE
 *
 * Serves one client on 127.0.0.1:PORT: fetches http://127.0.0.1:UPSTREAM_PORT/PATH and
 * relays its body. MODE:
 *   cache  a receiving thread recv()s 1 MiB at a time, sha256-hashes it (OpenSSL) and
 *          pwrite()s it to SPOOL, starting writeback every 16 MiB and dropping the page cache
 *          64 MiB behind the sender (mirrorcache's drop-behind); the main thread sendfile()s
 *          the spool to the client as it grows, holding the last byte back until the digest
 *          is known. What mirrorcache does for a cold blob.
 *   tee    the client first: recv() 1 MiB, send() it to the client at once (all but the
 *          last byte, held until the digest is known), then hand the buffer to a second
 *          thread that hashes and pwrite()s it (8 buffers in flight, drop-behind of what
 *          is written). The client's path carries no hash or file write; the machine still
 *          does all of it.
 *   pipe   recv() then send() the same buffer, no hash, no file: streaming only (what a
 *          proxy that neither verifies nor caches on the client's path costs).
 * Prints one JSON line: bytes, sha256 (cache mode), user and sys CPU seconds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF (1 << 20)
#define STEP (16 << 20)
#define KEEP (64L << 20)

static long long total, written, sent;
static int spool, done;
static char hexd[65];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int up;

static void die(const char *what) { perror(what); exit(1); }

static int dial(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a)) die("connect");
    return s;
}

/* Reads the response head; leaves any body bytes read with it in *extra. */
static long long read_head(int s, char *buf, int *extra) {
    int got = 0;
    char *end;
    for (;;) {
        int n = recv(s, buf + got, BUF - got, 0);
        if (n <= 0) die("head");
        got += n;
        buf[got] = 0;
        if ((end = strstr(buf, "\r\n\r\n"))) break;
    }
    char *cl = strcasestr(buf, "content-length:");
    if (!cl || strncmp(buf, "HTTP/1.1 200", 12)) { fprintf(stderr, "bad head: %.200s\n", buf); exit(1); }
    long long len = atoll(cl + 15);
    int head = end + 4 - buf;
    *extra = got - head;
    memmove(buf, buf + head, *extra);
    return len;
}

static void *receive(void *arg) {
    char *buf = arg;
    int have = *(int *)(buf + BUF + 8);
    EVP_MD_CTX *h = EVP_MD_CTX_new();
    EVP_DigestInit_ex(h, EVP_sha256(), NULL);
    long long off = 0, wb = 0, dropped = 0;
    while (off < total) {
        while (have < BUF && off + have < total) {
            int n = recv(up, buf + have, (BUF - have < total - off - have) ? BUF - have
                                                                            : total - off - have, 0);
            if (n <= 0) die("recv");
            have += n;
        }
        EVP_DigestUpdate(h, buf, have);
        for (int w = 0; w < have;) {
            ssize_t n = pwrite(spool, buf + w, have - w, off + w);
            if (n <= 0) die("pwrite");
            w += n;
        }
        off += have;
        have = 0;
        while (off - wb >= STEP) { sync_file_range(spool, wb, STEP, SYNC_FILE_RANGE_WRITE); wb += STEP; }
        pthread_mutex_lock(&mu);
        written = off;
        long long low = sent;
        pthread_cond_signal(&cv);
        pthread_mutex_unlock(&mu);
        long long until = (low - KEEP < wb ? low - KEEP : wb) & ~4095LL;
        if (until > dropped) {
            long long from = dropped > 2 * STEP ? dropped - 2 * STEP : 0;
            posix_fadvise(spool, from, until - from, POSIX_FADV_DONTNEED);
            dropped = until;
        }
    }
    unsigned char md[32];
    unsigned int mdlen;
    EVP_DigestFinal_ex(h, md, &mdlen);
    for (int i = 0; i < 32; i++) sprintf(hexd + 2 * i, "%02x", md[i]);
    pthread_mutex_lock(&mu);
    done = 1;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    return NULL;
}

#define RING 8
static char *ring[RING];
static int ring_len[RING];
static long long produced, consumed;  /* buffers handed over / hashed and written */

static void *hash_and_write(void *arg) {
    (void)arg;
    EVP_MD_CTX *h = EVP_MD_CTX_new();
    EVP_DigestInit_ex(h, EVP_sha256(), NULL);
    long long off = 0, wb = 0;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (consumed == produced && !done) pthread_cond_wait(&cv, &mu);
        if (consumed == produced && done) { pthread_mutex_unlock(&mu); break; }
        int i = consumed % RING;
        pthread_mutex_unlock(&mu);
        EVP_DigestUpdate(h, ring[i], ring_len[i]);
        for (int w = 0; w < ring_len[i];) {
            ssize_t n = pwrite(spool, ring[i] + w, ring_len[i] - w, off + w);
            if (n <= 0) die("pwrite");
            w += n;
        }
        off += ring_len[i];
        while (off - wb >= STEP) {
            sync_file_range(spool, wb, STEP, SYNC_FILE_RANGE_WRITE);
            if (wb >= 2 * STEP) posix_fadvise(spool, wb - 2 * STEP, STEP, POSIX_FADV_DONTNEED);
            wb += STEP;
        }
        pthread_mutex_lock(&mu);
        consumed++;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    }
    unsigned char md[32];
    unsigned int mdlen;
    EVP_DigestFinal_ex(h, md, &mdlen);
    for (int i = 0; i < 32; i++) sprintf(hexd + 2 * i, "%02x", md[i]);
    return NULL;
}

static void send_all(int c, const char *p, long long n) {
    while (n > 0) { ssize_t k = send(c, p, n, 0); if (k <= 0) die("send"); p += k; n -= k; }
}

static void relay_tee(int c, char *head, int extra) {
    for (int i = 0; i < RING; i++) ring[i] = malloc(BUF);
    pthread_t t;
    pthread_create(&t, NULL, hash_and_write, NULL);
    long long off = 0;
    while (off < total) {
        pthread_mutex_lock(&mu);
        while (produced - consumed == RING) pthread_cond_wait(&cv, &mu);
        int i = produced % RING;
        pthread_mutex_unlock(&mu);
        int have = 0;
        if (extra) { memcpy(ring[i], head, extra); have = extra; extra = 0; }
        while (have < BUF && off + have < total) {
            int n = recv(up, ring[i] + have, (BUF - have < total - off - have) ? BUF - have
                                                                              : total - off - have, 0);
            if (n <= 0) die("recv");
            have += n;
        }
        ring_len[i] = have;
        off += have;
        send_all(c, ring[i], off == total ? have - 1 : have);  /* the last byte waits */
        pthread_mutex_lock(&mu);
        produced++;
        if (off == total) done = 1;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    }
    pthread_join(t, NULL);
    /* verified (floor.py checks hexd against the digest): the last byte goes */
    int last = (produced - 1) % RING;
    send_all(c, ring[last] + ring_len[last] - 1, 1);
    sent = total;
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: floor_relay PORT UPSTREAM_PORT PATH SPOOL cache|tee|pipe\n"); return 2; }
    int cache = !strcmp(argv[5], "cache");
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 8)) die("listen");
    printf("ready\n");
    fflush(stdout);
    int c = accept(ls, NULL, NULL);
    char *buf = malloc(BUF + 64), req[8192];
    if (recv(c, req, sizeof req, 0) <= 0) die("request");
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    up = dial(atoi(argv[2]));
    char get[4096];
    int gl = snprintf(get, sizeof get, "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: floor-relay\r\n"
                      "Accept-Encoding: identity\r\nConnection: close\r\n\r\n", argv[3]);
    if (send(up, get, gl, 0) != gl) die("send");
    int extra;
    total = read_head(up, buf, &extra);
    char head[256];
    int hl = snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                      "Content-Length: %lld\r\nConnection: close\r\n\r\n", total);
    if (send(c, head, hl, 0) != hl) die("send head");
    if (!strcmp(argv[5], "tee")) {
        spool = open(argv[4], O_RDWR | O_CREAT | O_TRUNC, 0644);
        if (spool < 0) die("spool");
        relay_tee(c, buf, extra);
    } else if (!cache) {
        long long off = extra;
        if (extra && send(c, buf, extra, 0) != extra) die("send");
        while (off < total) {
            int n = recv(up, buf, BUF, 0);
            if (n <= 0) die("recv");
            for (int w = 0; w < n;) { ssize_t k = send(c, buf + w, n - w, 0); if (k <= 0) die("send"); w += k; }
            off += n;
        }
        sent = off;
    } else {
        spool = open(argv[4], O_RDWR | O_CREAT | O_TRUNC, 0644);
        if (spool < 0) die("spool");
        *(int *)(buf + BUF + 8) = extra;
        pthread_t t;
        pthread_create(&t, NULL, receive, buf);
        for (;;) {
            pthread_mutex_lock(&mu);
            while (!done && written - 1 <= sent) pthread_cond_wait(&cv, &mu);
            long long until = done ? written : written - 1;  /* the last byte waits */
            int fin = done;
            pthread_mutex_unlock(&mu);
            off_t o = sent;
            while (o < until) {
                ssize_t n = sendfile(c, spool, &o, until - o);
                if (n <= 0) die("sendfile");
            }
            pthread_mutex_lock(&mu);
            sent = o;
            pthread_mutex_unlock(&mu);
            if (fin && sent == total) break;
        }
        pthread_join(t, NULL);
    }
    getrusage(RUSAGE_SELF, &r1);
    double u = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) + (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec) / 1e6;
    double s = (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) + (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec) / 1e6;
    printf("{\"bytes\": %lld, \"sha256\": \"%s\", \"user\": %.3f, \"sys\": %.3f}\n", sent, hexd, u, s);
    shutdown(c, SHUT_WR);
    char sink[256];
    while (recv(c, sink, sizeof sink, 0) > 0) {}
    return 0;
}
