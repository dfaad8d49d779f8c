// PURGE <path>: remove the cache entry of <path> (nginx stores it under the MD5 of its key, $uri, in
// levels=1:2 directories); PURGE <anything>*: remove every entry. nginx treats a missing file as a miss,
// so the next request fetches the origin's current copy. 200: purged, 404: not cached.
var fs = require('fs');
var crypto = require('crypto');

var CACHE = '/run/edge/cache';

function entry(key) {
    var md5 = crypto.createHash('md5').update(key).digest('hex');
    return CACHE + '/' + md5.slice(-1) + '/' + md5.slice(-3, -1) + '/' + md5;
}

function removeAll(dir) {
    var n = 0;
    fs.readdirSync(dir, {withFileTypes: true}).forEach(function (d) {
        var path = dir + '/' + d.name;
        if (d.isDirectory()) {
            n += removeAll(path);
        } else {
            fs.unlinkSync(path);
            n += 1;
        }
    });
    return n;
}

function purge(r) {
    if (r.method !== 'PURGE') {
        r.return(405, 'PURGE only\n');
        return;
    }
    try {
        if (r.uri.endsWith('*')) {
            r.return(200, 'purged ' + removeAll(CACHE) + ' entries\n');
            return;
        }
        fs.unlinkSync(entry(r.uri));
        r.return(200, 'purged\n');
    } catch (e) {
        r.return(e.code === 'ENOENT' ? 404 : 500, (e.code === 'ENOENT' ? 'not cached' : e.message) + '\n');
    }
}

export default {purge};
