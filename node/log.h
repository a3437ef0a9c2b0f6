/* log.h: leveled logging to stderr. Never pass key material to it. */
#ifndef KR_LOG_H
#define KR_LOG_H

enum log_level { LOG_LEVEL_DEBUG, LOG_LEVEL_INFO, LOG_LEVEL_WARN, LOG_LEVEL_ERROR };

void log_set_level(enum log_level level);
/* Parses "debug|info|warn|error"; returns -1 when unknown. */
int log_level_parse(const char *name);
void log_msg(enum log_level level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define log_debug(...) log_msg(LOG_LEVEL_DEBUG, KR_LOG_MODULE, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LEVEL_INFO, KR_LOG_MODULE, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LEVEL_WARN, KR_LOG_MODULE, __VA_ARGS__)
#define log_error(...) log_msg(LOG_LEVEL_ERROR, KR_LOG_MODULE, __VA_ARGS__)

#endif
