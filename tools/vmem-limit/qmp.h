/* SPDX-License-Identifier: GPL-2.0-or-later */
/* A minimal QMP client: one connection, synchronous commands, queued events. */
#ifndef VMEM_QMP_H
#define VMEM_QMP_H

#include <json-glib/json-glib.h>

typedef struct Qmp Qmp;

Qmp *qmp_connect(const char *path, GError **errp);
void qmp_close(Qmp *q);
/* The pid of the process listening on the socket (SO_PEERCRED), or 0. */
int qmp_peer_pid(Qmp *q);

/*
 * Runs one command (args may be NULL; it is consumed) and returns its
 * "return" member.  An error reply is VMEM_EXIT_REFUSED with QEMU's
 * words; *class gets its class where not NULL (e.g. "CommandNotFound").
 * *sent tells whether the command was written.
 */
JsonNode *qmp_call(Qmp *q, const char *cmd, JsonObject *args,
                   char **class, gboolean *sent, GError **errp);

/*
 * Reads until an event arrives or timeout_ms passes (-1: forever); events
 * are queued.  FALSE when the connection is lost.
 */
gboolean qmp_wait_event(Qmp *q, int timeout_ms, GError **errp);

/* Oldest queued event (transfer full) or NULL. */
JsonObject *qmp_pop_event(Qmp *q);

#endif
