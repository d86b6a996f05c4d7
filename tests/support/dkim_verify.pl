#!/usr/bin/perl
# Verifies the DKIM signatures of a message with Perl's Mail::DKIM (Debian libmail-dkim-perl;
# Ed25519 through CryptX, libcryptx-perl): an implementation independent of the dkimpy that
# signs.  Usage: perl dkim_verify.pl DNS_PORT < message
# The keys are looked up on the tests' DNS server at 127.0.0.1:DNS_PORT (Net::DNS), never
# the machine's resolver.  Prints one line per signature,
#   domain selector algorithm result (detail)
# then "overall: <result>", and exits 0.  Exit 2: the modules are missing (the test skips).
use strict;
use warnings;

my $port = shift @ARGV or die "usage: dkim_verify.pl DNS_PORT < message\n";
for my $module (qw(Mail::DKIM::Verifier Mail::DKIM::DNS Net::DNS::Resolver Crypt::PK::Ed25519)) {
    eval "require $module; 1" or do { print "missing: $module\n"; exit 2 };
}
my $resolver = Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $port, recurse => 1,
    udp_timeout => 5, tcp_timeout => 5, retry => 1, searchlist => [], defnames => 0,
);
Mail::DKIM::DNS::resolver($resolver);

my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\015?\012\z//;
    $dkim->PRINT("$line\015\012");
}
$dkim->CLOSE;
for my $signature ($dkim->signatures) {
    printf "%s %s %s %s (%s)\n", $signature->domain, $signature->selector,
        $signature->algorithm, $signature->result, $signature->result_detail;
}
printf "overall: %s\n", $dkim->result;
exit 0;
