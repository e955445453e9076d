/*
 * Host ABI v1 of edge-agent for modules written in C: the host's imports, the return codes, log
 * levels and size limits, and macros to export functions. The C form of the edge-abi crate
 * (modules/abi/src/lib.rs), which is the reference; modules/sdk/tests/c_header.rs checks that the
 * two agree.
 *
 * Build a module with clang for wasm32, freestanding, with no libc and no entry point:
 *
 *   clang --target=wasm32 -O2 -ffreestanding -nostdlib -Wl,--no-entry \
 *         -Wl,-z,stack-size=65536 -o module.wasm module.c
 *
 * A module exports its memory (wasm-ld does so by default), the ABI marker (EDGE_ABI_V1_MARKER,
 * once), and edge_alloc if it exports on_message. It may export, with EDGE_EXPORT:
 *
 *   int32_t init(void);     once, after instantiation; 0 means ready
 *   int32_t tick(void);     every tick_interval_ms of the manifest; 0 means fine
 *   int32_t on_message(const char *topic, int32_t topic_len,
 *                      const uint8_t *payload, int32_t payload_len);
 *                           a message; both buffers came from edge_alloc and are the module's
 *   int32_t edge_alloc(int32_t size);
 *                           size bytes for the host to place a message in; 0 if it cannot
 *
 * Non-zero from init, tick or on_message is a failure the host reports. The host refuses at
 * install a module that imports anything not declared here, imports edge_publish without a
 * caps.publish grant, or edge_kv_* without caps.kv_quota_bytes. A pointer and length the host
 * cannot use make a call fail with EDGE_ERR_BAD_POINTER; it never reaches outside the memory.
 */
#ifndef EDGE_ABI_H
#define EDGE_ABI_H

#include <stdint.h>

/* The ABI version this header describes. */
#define EDGE_ABI_VERSION 1

/* Return codes: zero or positive is success; these negative codes are the failures. */
#define EDGE_OK 0
#define EDGE_ERR_BAD_POINTER (-1)    /* a pointer or length lies outside the module's memory */
#define EDGE_ERR_DENIED (-2)         /* the manifest does not grant this */
#define EDGE_ERR_TOO_LARGE (-3)      /* an argument is larger than the limits below allow */
#define EDGE_ERR_RATE_LIMITED (-4)   /* too many calls in too short a time; try again later */
#define EDGE_ERR_QUOTA_EXCEEDED (-5) /* the key-value quota would be exceeded */
#define EDGE_ERR_NOT_FOUND (-6)      /* no such key */
#define EDGE_ERR_BAD_ARGUMENT (-7)   /* unknown log level, malformed or non-UTF-8 topic, ... */
#define EDGE_ERR_BUSY (-8)           /* the module's outgoing queue is full for this call */
#define EDGE_ERR_UNAVAILABLE (-9)    /* the host could not do it (storage, random source) */

/* Log levels for edge_log. */
#define EDGE_LEVEL_ERROR 1
#define EDGE_LEVEL_WARN 2
#define EDGE_LEVEL_INFO 3
#define EDGE_LEVEL_DEBUG 4

/* Size limits, in bytes. */
#define EDGE_LOG_LINE_MAX 1024  /* longer log lines are truncated; the call still succeeds */
#define EDGE_TOPIC_MAX 256      /* topic, relative to the module's namespace */
#define EDGE_PAYLOAD_MAX 65536  /* one publish, and one message to on_message */
#define EDGE_KV_KEY_MAX 128
#define EDGE_KV_VALUE_MAX 16384
#define EDGE_RANDOM_MAX 1024    /* most bytes one edge_random call fills */

/* Declares a host import: module "edge", the given name. */
#define EDGE_IMPORT(name) __attribute__((import_module("edge"), import_name(#name)))

/* Exports the function it precedes under its name: EDGE_EXPORT(tick) int32_t tick(void) { ... } */
#define EDGE_EXPORT(name) __attribute__((export_name(#name)))

/* Defines the ABI marker export, a function the host never calls. Use it once per module. */
#define EDGE_ABI_V1_MARKER \
    EDGE_EXPORT(edge_abi_v1) void edge_abi_v1(void) {}

/* Writes len bytes at ptr to the module's log at level (EDGE_LEVEL_*). Always granted. */
EDGE_IMPORT(log) int32_t edge_log(int32_t level, const char *ptr, int32_t len);

/* Milliseconds since the Unix epoch. Always granted. */
EDGE_IMPORT(now_ms) int64_t edge_now_ms(void);

/* Fills len bytes at ptr (at most EDGE_RANDOM_MAX) with random bytes. Always granted. */
EDGE_IMPORT(random) int32_t edge_random(void *ptr, int32_t len);

/* Publishes a payload to a topic relative to the module's namespace, which must match one of
 * the manifest's caps.publish filters. Needs caps.publish. */
EDGE_IMPORT(publish) int32_t edge_publish(const char *topic, int32_t topic_len,
                                          const void *payload, int32_t payload_len);

/* Returns the length of the value under a key, copying it to buf only when it fits in buf_cap
 * (so a return above buf_cap asks for a larger buffer). Needs caps.kv_quota_bytes. */
EDGE_IMPORT(kv_get) int32_t edge_kv_get(const char *key, int32_t key_len,
                                        void *buf, int32_t buf_cap);

/* Stores a value under a key. Needs caps.kv_quota_bytes. */
EDGE_IMPORT(kv_set) int32_t edge_kv_set(const char *key, int32_t key_len,
                                        const void *val, int32_t val_len);

/* Deletes a key. Needs caps.kv_quota_bytes. */
EDGE_IMPORT(kv_delete) int32_t edge_kv_delete(const char *key, int32_t key_len);

#endif /* EDGE_ABI_H */
