# qresyncd build. Out-of-tree variants: build/release (default), build/asan.
#   make            build ./qresyncd (release)
#   make check      install deps, build both variants, run every test
#   make demo       install deps, build, run the local demo
#   make bench      benchmarks (not tests; they print ratios)
#   make format     clang-format the tree

VARIANT ?= release
BUILD   := build/$(VARIANT)
CC      ?= cc

WARN := -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -Wshadow \
        -Wstrict-prototypes -Wmissing-prototypes -Wformat=2 -Wundef -Wvla
ifeq ($(VARIANT),asan)
OPT := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
else
OPT := -O2 -g -fstack-protector-strong -D_FORTIFY_SOURCE=2
endif

CPPFLAGS := -I.
CFLAGS   := $(WARN) $(OPT) $(EXTRA_CFLAGS)
LDFLAGS  := $(OPT)
LIBS     := -luv -lhiredis -linih -lmbedtls -lmbedx509 -lmbedcrypto -lm
TESTLIBS := -lcriterion

COMMON_SRC := $(wildcard common/*.c)
STATE_SRC  := $(wildcard state/*.c)
PROXY_SRC  := $(filter-out proxy/main.c,$(wildcard proxy/*.c))
UNIT_SRC   := $(wildcard tests/unit/test_*.c)
FUZZ_SRC   := $(wildcard tests/fuzz/fuzz_*.c)

LIB_OBJ  := $(patsubst %.c,$(BUILD)/%.o,$(COMMON_SRC) $(STATE_SRC) $(PROXY_SRC))
UNIT_BIN := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(UNIT_SRC))
FUZZ_BIN := $(patsubst tests/fuzz/%.c,$(BUILD)/tests/%,$(FUZZ_SRC))

.PHONY: all deps check unit demo bench format format-check clean fuzz

all: $(BUILD)/qresyncd
ifeq ($(VARIANT),release)
	@cp $(BUILD)/qresyncd ./qresyncd.tmp && mv -f ./qresyncd.tmp ./qresyncd
	@echo "built ./qresyncd"
endif

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libqr.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/qresyncd: $(BUILD)/proxy/main.o $(BUILD)/libqr.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LIBS)

# Unit tests: criterion's Test() macro defines functions without prototypes.
$(BUILD)/tests/test_%: tests/unit/test_%.c $(BUILD)/libqr.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -Wno-missing-prototypes -o $@ $^ $(LIBS) $(TESTLIBS)

# Fuzz targets built with a plain main() that replays the corpus (tests/fuzz/replay.c);
# `make fuzz` builds them with clang's libFuzzer for open-ended runs.
$(BUILD)/tests/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/replay.c $(BUILD)/libqr.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $^ $(LIBS)

unit: $(UNIT_BIN) $(FUZZ_BIN)

deps:
	./deploy/install-deps.sh

check: deps
	$(MAKE) VARIANT=release all unit
	$(MAKE) VARIANT=asan all unit
	./tests/run-checks.sh

demo: deps
	$(MAKE) VARIANT=release all
	./deploy/demo.sh

bench: deps
	$(MAKE) VARIANT=release all
	./tests/bench/run.sh

fuzz:
	./tests/fuzz/run-libfuzzer.sh

FORMAT_FILES = $(shell git ls-files 'common/*.[ch]' 'state/*.[ch]' 'proxy/*.[ch]' 'tests/*.[ch]')
format:
	clang-format -i $(FORMAT_FILES)

format-check:
	clang-format --dry-run -Werror $(FORMAT_FILES)

clean:
	rm -rf build qresyncd

-include $(shell find build -name '*.d' 2>/dev/null)
