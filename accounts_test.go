package zimage

import (
	"time"

	"go.uber.org/zap"
)

// unitPool is an account pool built by hand: one unlimited account, for
// unit tests that assemble a Gateway without Provision.
func unitPool() *accountPool {
	return &accountPool{
		accounts: []*account{{name: defaultAccount, lim: &limiter{queued: true}}},
		timeout:  time.Minute, queueTimeout: time.Minute, logger: zap.NewNop(),
	}
}

// unitLimit is the limit in force on an account.
func unitLimit(a *account) int {
	limMu.Lock()
	defer limMu.Unlock()
	return a.lim.limitLocked()
}
