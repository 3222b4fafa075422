// Package proc holds what the memory benchmarks (bench/b64mem,
// bench/uploadmem) share: a Caddy process's resident set, waiting for it
// to answer, free ports and failing loudly.
package proc

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// RSS is the process's resident set in bytes (VmRSS).
func RSS(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// WaitUp waits until the gateway at base answers /v1/models.
func WaitUp(base string) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get(base + "/v1/models"); err == nil {
			resp.Body.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	Fail("Caddy did not start")
}

// FreePort asks the kernel for a free loopback port.
func FreePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	Check(err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// MB is bytes in (decimal) megabytes.
func MB(b int64) float64 { return float64(b) / 1e6 }

// Check fails on an error.
func Check(err error) {
	if err != nil {
		Fail(err.Error())
	}
}

// Fail prints msg, prefixed with the program's name, and exits.
func Fail(msg string) {
	fmt.Fprintln(os.Stderr, filepath.Base(os.Args[0])+":", msg)
	os.Exit(1)
}
