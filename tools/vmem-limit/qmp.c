// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * A minimal QMP client for vmem-limit.
 *
 * One connection, one command at a time.  QEMU may send events between a
 * command and its reply; they are queued for the caller instead of being
 * dropped, because the follow mode lives on them.
 */
#define _GNU_SOURCE     /* struct ucred */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "vmem-limit.h"
#include "qmp.h"

/* A command QEMU does not answer within this time counts as lost. */
#define QMP_REPLY_TIMEOUT_MS 30000
/* QEMU greets at once; a monitor that stays silent this long is no QMP. */
#define QMP_GREETING_TIMEOUT_MS 5000
/* QEMU's greeting is a few hundred bytes; more without a newline is no QMP. */
#define QMP_GREETING_MAX 65536

struct Qmp {
    int fd;
    char *path;
    GString *buf;
    GQueue events;
    int peer_pid;
};

static gboolean qmp_lost(Qmp *q, const char *why, GError **errp)
{
    g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                "QMP socket %s: %s; is QEMU still running?", q->path, why);
    return FALSE;
}

/*
 * Reads more bytes into the buffer, waiting at most timeout_ms.
 * Returns 1 on data, 0 on timeout, -1 (error set) on EOF or error.
 */
static int qmp_fill(Qmp *q, int timeout_ms, GError **errp)
{
    struct pollfd pfd = { .fd = q->fd, .events = POLLIN };
    char chunk[65536];
    ssize_t n;
    int r;

    do {
        r = poll(&pfd, 1, timeout_ms);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        qmp_lost(q, g_strerror(errno), errp);
        return -1;
    }
    if (r == 0) {
        return 0;
    }
    do {
        n = read(q->fd, chunk, sizeof(chunk));
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        qmp_lost(q, g_strerror(errno), errp);
        return -1;
    }
    if (n == 0) {
        qmp_lost(q, "connection closed", errp);
        return -1;
    }
    g_string_append_len(q->buf, chunk, n);
    return 1;
}

/* The next complete message in the buffer, or NULL. */
static JsonObject *qmp_next_message(Qmp *q, GError **errp)
{
    char *nl;
    g_autofree char *line = NULL;
    g_autoptr(JsonNode) node = NULL;
    g_autoptr(GError) err = NULL;

    while ((nl = memchr(q->buf->str, '\n', q->buf->len))) {
        line = g_strndup(q->buf->str, nl - q->buf->str);
        g_string_erase(q->buf, 0, nl - q->buf->str + 1);
        g_strstrip(line);
        if (*line) {
            break;
        }
        g_clear_pointer(&line, g_free);
    }
    if (!line) {
        return NULL;
    }
    node = json_from_string(line, &err);
    if (!node || !JSON_NODE_HOLDS_OBJECT(node)) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                    "QMP socket %s: not a QMP message: %.80s", q->path, line);
        return NULL;
    }
    return json_object_ref(json_node_get_object(node));
}

static gboolean qmp_write(Qmp *q, const char *text, GError **errp)
{
    size_t len = strlen(text), done = 0;

    while (done < len) {
        ssize_t n = send(q->fd, text + done, len - done, MSG_NOSIGNAL);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            return qmp_lost(q, g_strerror(errno), errp);
        }
        done += n;
    }
    return TRUE;
}

JsonNode *qmp_call(Qmp *q, const char *cmd, JsonObject *args,
                   char **class, gboolean *sent, GError **errp)
{
    g_autoptr(JsonBuilder) b = json_builder_new();
    g_autoptr(JsonNode) root = NULL;
    g_autofree char *text = NULL;
    gint64 deadline = g_get_monotonic_time() +
                      QMP_REPLY_TIMEOUT_MS * (gint64)1000;

    if (sent) {
        *sent = FALSE;
    }
    json_builder_begin_object(b);
    json_builder_set_member_name(b, "execute");
    json_builder_add_string_value(b, cmd);
    if (args) {
        JsonNode *a = json_node_new(JSON_NODE_OBJECT);

        json_node_take_object(a, args);
        json_builder_set_member_name(b, "arguments");
        json_builder_add_value(b, a);
    }
    json_builder_end_object(b);
    root = json_builder_get_root(b);
    text = json_to_string(root, FALSE);
    if (!qmp_write(q, text, errp) || !qmp_write(q, "\n", errp)) {
        return NULL;
    }
    if (sent) {
        *sent = TRUE;
    }

    for (;;) {
        g_autoptr(JsonObject) msg = NULL;
        GError *err = NULL;
        int left, r;

        msg = qmp_next_message(q, &err);
        if (err) {
            g_propagate_error(errp, err);
            return NULL;
        }
        if (msg && json_object_has_member(msg, "event")) {
            g_queue_push_tail(&q->events, g_steal_pointer(&msg));
            continue;
        }
        if (msg && json_object_has_member(msg, "return")) {
            return json_node_copy(json_object_get_member(msg, "return"));
        }
        if (msg && json_object_has_member(msg, "error")) {
            JsonObject *e = json_object_get_object_member(msg, "error");
            const char *desc = "(no description)";

            if (e) {
                desc = json_object_get_string_member_with_default(e, "desc",
                                                                  desc);
            }
            if (class && e) {
                *class = g_strdup(json_object_get_string_member_with_default(
                                  e, "class", ""));
            }
            g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_REFUSED,
                        "QEMU refused %s: %s", cmd, desc);
            return NULL;
        }
        if (msg) {
            continue;   /* greeting or something newer than us */
        }
        left = (int)((deadline - g_get_monotonic_time()) / 1000);
        if (left <= 0) {
            qmp_lost(q, "no reply within 30 s", errp);
            return NULL;
        }
        r = qmp_fill(q, left, errp);
        if (r < 0) {
            return NULL;
        }
    }
}

gboolean qmp_wait_event(Qmp *q, int timeout_ms, GError **errp)
{
    gint64 deadline = timeout_ms < 0 ? -1 :
                      g_get_monotonic_time() + timeout_ms * (gint64)1000;

    while (g_queue_is_empty(&q->events)) {
        g_autoptr(JsonObject) msg = NULL;
        GError *err = NULL;
        int left = -1;

        msg = qmp_next_message(q, &err);
        if (err) {
            g_propagate_error(errp, err);
            return FALSE;
        }
        if (msg) {
            if (json_object_has_member(msg, "event")) {
                g_queue_push_tail(&q->events, g_steal_pointer(&msg));
            }
            continue;
        }
        if (deadline >= 0) {
            left = (int)((deadline - g_get_monotonic_time()) / 1000);
            if (left <= 0) {
                break;
            }
        }
        if (qmp_fill(q, left, errp) < 0) {
            return FALSE;
        }
    }
    return TRUE;
}

JsonObject *qmp_pop_event(Qmp *q)
{
    return g_queue_pop_head(&q->events);
}

/*
 * Why connect() to path failed, in words that say what to do.  A path
 * that is no socket, and a socket nobody listens on (QEMU gone, its file
 * left behind), are told apart from a missing one.
 */
static void qmp_connect_error(const char *path, int e, GError **errp)
{
    struct stat st;

    if (e == EACCES || e == EPERM) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_PERMISSION,
                    "QMP socket %s: %s; run as the user that owns it",
                    path, g_strerror(e));
    } else if (stat(path, &st) == 0 && !S_ISSOCK(st.st_mode)) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                    "%s is not a socket but a %s; give --qmp the path of "
                    "QEMU's QMP socket (-chardev socket,path=...)", path,
                    S_ISDIR(st.st_mode) ? "directory" :
                    S_ISREG(st.st_mode) ? "regular file" : "special file");
    } else if (e == ECONNREFUSED) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                    "nobody listens on QMP socket %s: the QEMU that made it "
                    "has exited (is the VM running?)", path);
    } else if (e == ENOENT) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                    "no QMP socket %s: is the VM running?  Start QEMU with "
                    "-chardev socket,id=mon1,path=%s,server=on,wait=off "
                    "-mon chardev=mon1,mode=control", path, path);
    } else {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                    "QMP socket %s: %s", path, g_strerror(e));
    }
}

/*
 * Waits for QMP's greeting, {"QMP": {...}}, the first thing QEMU sends.
 * Nothing is written before it has come: a socket that is not QMP (a
 * serial console, HMP) must not receive a command it might run.
 */
static gboolean qmp_greeting(Qmp *q, GError **errp)
{
    gint64 deadline = g_get_monotonic_time() +
                      QMP_GREETING_TIMEOUT_MS * (gint64)1000;
    g_autoptr(JsonNode) node = NULL;
    g_autofree char *line = NULL;
    const char *text;
    char *nl = NULL;

    for (;;) {
        int left, r;

        /* Blank lines first (a console's "\r\n") say nothing yet. */
        text = q->buf->str + strspn(q->buf->str, " \t\r\n");
        if (*text && *text != '{') {
            break;      /* whatever it is, it is not QMP's JSON */
        }
        nl = *text ? strchr(text, '\n') : NULL;
        if (nl || q->buf->len > QMP_GREETING_MAX) {
            break;      /* a line, or JSON-looking text too long for one */
        }
        left = (int)((deadline - g_get_monotonic_time()) / 1000);
        r = left > 0 ? qmp_fill(q, left, errp) : 0;
        if (r < 0) {
            return FALSE;
        }
        if (r == 0 && *text) {
            break;      /* JSON-looking text that never ends its line */
        }
        if (r == 0) {
            g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                        "QMP socket %s sent no QMP greeting within %d s: it "
                        "is not a QMP monitor (a serial console says nothing "
                        "until spoken to), another client holds it (QEMU "
                        "serves one client per monitor: add a second -mon), "
                        "or QEMU hangs", q->path,
                        QMP_GREETING_TIMEOUT_MS / 1000);
            return FALSE;
        }
    }
    line = g_strndup(text, strcspn(text, "\n"));
    node = nl ? json_from_string(g_strstrip(line), NULL) : NULL;
    if (!node || !JSON_NODE_HOLDS_OBJECT(node) ||
        !json_object_has_member(json_node_get_object(node), "QMP")) {
        g_autofree char *shown = g_strescape(g_strstrip(line), NULL);

        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                    "%s is not a QMP socket: it began with \"%.60s\" where "
                    "QMP greets with {\"QMP\": ...}; give --qmp a monitor "
                    "in mode=control, not a console or HMP", q->path, shown);
        return FALSE;
    }
    g_string_erase(q->buf, 0, nl - q->buf->str + 1);
    return TRUE;
}

Qmp *qmp_connect(const char *path, GError **errp)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    struct ucred cred;
    socklen_t len = sizeof(cred);
    g_autoptr(JsonNode) ret = NULL;
    Qmp *q;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                    "QMP socket path %s is too long for a unix socket "
                    "(%zu bytes at most)", path, sizeof(sa.sun_path) - 1);
        return NULL;
    }
    strcpy(sa.sun_path, path);

    q = g_new0(Qmp, 1);
    q->path = g_strdup(path);
    q->buf = g_string_new(NULL);
    g_queue_init(&q->events);
    q->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (q->fd < 0 || connect(q->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        qmp_connect_error(path, errno, errp);
        qmp_close(q);
        return NULL;
    }
    /* The process that listens: QEMU, unless the socket is not QEMU's. */
    if (getsockopt(q->fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
        q->peer_pid = cred.pid;
    }
    if (!qmp_greeting(q, errp)) {
        qmp_close(q);
        return NULL;
    }
    ret = qmp_call(q, "qmp_capabilities", NULL, NULL, NULL, errp);
    if (!ret) {
        qmp_close(q);
        return NULL;
    }
    return q;
}

int qmp_peer_pid(Qmp *q)
{
    return q->peer_pid;
}

void qmp_close(Qmp *q)
{
    if (!q) {
        return;
    }
    if (q->fd >= 0) {
        close(q->fd);
    }
    g_queue_clear_full(&q->events, (GDestroyNotify)json_object_unref);
    g_string_free(q->buf, TRUE);
    g_free(q->path);
    g_free(q);
}
