/*
 * Example module in C: logs on init, publishes a counter to c-counter/count on every tick (as
 * decimal ASCII), and restarts the count when a message arrives.
 */
#include "../edge_abi.h"

/* A string literal as the pointer and length the imports take. */
#define LITERAL(s) (s), (int32_t)(sizeof(s) - 1)

EDGE_ABI_V1_MARKER

static uint64_t count;

/* edge_alloc hands out bytes of this arena, which holds one message (topic and payload) at a
 * time; on_message empties it when it is done with the message. */
static uint8_t arena[EDGE_TOPIC_MAX + EDGE_PAYLOAD_MAX];
static uint32_t arena_used;

EDGE_EXPORT(edge_alloc) int32_t edge_alloc(int32_t size) {
    if (size < 0 || (uint32_t)size > sizeof arena - arena_used) {
        return 0;
    }
    uint8_t *bytes = &arena[arena_used];
    arena_used += (uint32_t)size;
    return (int32_t)(uintptr_t)bytes;
}

EDGE_EXPORT(init) int32_t init(void) {
    edge_log(EDGE_LEVEL_INFO, LITERAL("c-counter: started"));
    return 0;
}

EDGE_EXPORT(tick) int32_t tick(void) {
    char digits[20]; /* UINT64_MAX has 20 */
    char *first = digits + sizeof digits;
    uint64_t n = ++count;
    do {
        *--first = (char)('0' + n % 10);
        n /= 10;
    } while (n != 0);
    int32_t rc = edge_publish(LITERAL("c-counter/count"), first,
                              (int32_t)(digits + sizeof digits - first));
    return rc < 0 ? rc : 0;
}

EDGE_EXPORT(on_message) int32_t on_message(const char *topic, int32_t topic_len,
                                           const uint8_t *payload, int32_t payload_len) {
    (void)topic;
    (void)topic_len;
    (void)payload;
    (void)payload_len;
    count = 0;
    arena_used = 0; /* the message's buffers are no longer needed */
    edge_log(EDGE_LEVEL_INFO, LITERAL("c-counter: message received, count reset"));
    return 0;
}
