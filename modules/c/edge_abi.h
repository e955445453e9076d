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
 * caps.publish grant, edge_kv_* without caps.kv_quota_bytes, edge_gpio_* without caps.gpio,
 * edge_i2c_* without caps.i2c, or edge_spi_* without caps.spi. A pointer and length the host
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
#define EDGE_ERR_UNAVAILABLE (-9)    /* the host could not do it (storage, random source, or
                                        hardware this device does not have) */
#define EDGE_ERR_IO (-10)            /* the device did not answer or the bus failed (I2C NACK) */

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
#define EDGE_I2C_MAX 4096       /* most bytes one I2C call moves (each side of a write-read) */
#define EDGE_SPI_MAX 4096       /* most bytes one edge_spi_transfer moves */
#define EDGE_DELAY_MAX_US 100000           /* longest single edge_delay_us */
#define EDGE_DELAY_PER_CALL_MAX_US 1000000 /* most delay in one init/tick/on_message call */

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

/* Blocks the module at least us microseconds (at most EDGE_DELAY_MAX_US per call and
 * EDGE_DELAY_PER_CALL_MAX_US per entry-point call) without burning fuel: what drivers wait while
 * a device converts. Always granted. */
EDGE_IMPORT(delay_us) int32_t edge_delay_us(int32_t us);

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

/* Hardware. Each call fails with EDGE_ERR_DENIED for a line, bus + address or SPI device the
 * manifest does not grant, EDGE_ERR_UNAVAILABLE for hardware this device does not have,
 * EDGE_ERR_IO when the device did not answer or the bus failed, and EDGE_ERR_TOO_LARGE above
 * EDGE_I2C_MAX / EDGE_SPI_MAX bytes. I2C addresses are 7-bit (0x00 to 0x7f). */

/* Drives GPIO output line low (value 0) or high (non-zero). Needs the line in caps.gpio. */
EDGE_IMPORT(gpio_set) int32_t edge_gpio_set(int32_t line, int32_t value);

/* Reads GPIO line: 0 low, 1 high, or a negative code. Needs the line in caps.gpio. */
EDGE_IMPORT(gpio_get) int32_t edge_gpio_get(int32_t line);

/* Writes len bytes to the I2C device at addr on bus (start, address, bytes, stop). Needs the bus
 * and address in caps.i2c. */
EDGE_IMPORT(i2c_write) int32_t edge_i2c_write(int32_t bus, int32_t addr,
                                              const void *ptr, int32_t len);

/* Reads len bytes from the I2C device at addr on bus. Needs the bus and address in caps.i2c. */
EDGE_IMPORT(i2c_read) int32_t edge_i2c_read(int32_t bus, int32_t addr, void *ptr, int32_t len);

/* Writes write_len bytes, then reads read_len bytes after a repeated start (no stop in between):
 * a register read. Needs the bus and address in caps.i2c. */
EDGE_IMPORT(i2c_write_read) int32_t edge_i2c_write_read(int32_t bus, int32_t addr,
                                                        const void *write_ptr, int32_t write_len,
                                                        void *read_ptr, int32_t read_len);

/* A full-duplex transfer of len bytes with the SPI device at chip select cs on bus, which is
 * selected for the call: writes the bytes at write_ptr while reading as many into read_ptr
 * (which may equal write_ptr). Needs the device in caps.spi. */
EDGE_IMPORT(spi_transfer) int32_t edge_spi_transfer(int32_t bus, int32_t cs,
                                                    const void *write_ptr, void *read_ptr,
                                                    int32_t len);

#endif /* EDGE_ABI_H */
